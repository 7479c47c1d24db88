"""Serve a trained model over HTTP with LitServe: `python -m {{ cookiecutter.package_name }}.serve --ckpt_path best`.

    python -m {{ cookiecutter.package_name }}.serve --ckpt_path best                      # http://127.0.0.1:8000
    python -m {{ cookiecutter.package_name }}.serve --ckpt_path last --max_batch_size 32 --api_key "$KEY" --host 0.0.0.0

Needs the `serve` extra: pip install -e '.[serve]'. Every classifier answers the same contract:
`POST /predict` with `{"image": "<base64 PNG or JPEG>"}`, `{"features": {"<column>": value, ...}}`
or `{"text": "..."}` gives `{"class": "<name>", "index": k, "probabilities": {"<name>": p, ...}}`,
the same numbers as `python train.py predict` (the checkpoint's own normalisation, class names,
feature columns and tokenizer). A model that predicts a number (`Regressor`{% if cookiecutter.text == "yes" %}, `TextRegressor`{% endif %}) takes the
same request and answers `{"value": v}`, in the target's units, as `predict` writes it.
`GET /health` says "ok" once the model is loaded.

How a request travels (LitServe): an HTTP process (uvicorn) parses and checks the JSON body and
turns it into the model's input (a numpy array); an inference worker (one per device and
`--workers_per_device`) gathers concurrent requests into batches of up to `--max_batch_size`,
waiting at most `--batch_timeout` seconds for a batch to fill, and runs the model. Requests are
checked in the HTTP process, not in the worker, because LitServe fails a whole batch when one of its
requests fails: a bad request gets its 4xx alone and never reaches a batch.

What this file adds to LitServe as it comes: malformed JSON and bad fields get a 4xx with a JSON
body naming the problem (LitServe answers 500); a body size limit; `--api_key` (401 without it);
SIGTERM stops the server and every process it started, with exit code 0 (LitServe exits with 143
and leaves its workers running).

One LitAPI per kind of model, in `KINDS`, keyed by the checkpoint's model class (its name, or a
base class's). Generative kinds (a language model trained from zero, a chat model) plug in through
`TextGenerator`: `PromptAPI` serves `POST /predict {"prompt": ...}`, `ChatAPI` the OpenAI-compatible
`/v1/chat/completions`.
"""

import argparse
import base64
import binascii
{% if cookiecutter.gpt == "yes" or cookiecutter.chat == "yes" -%}
import functools
{% endif -%}
import hmac
import importlib
import io
import json
import math
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import UserError, first_line, load_model, print_error, read_checkpoint

SERVE_EXTRA = "pip install -e '.[serve]'"
HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds to
OPEN_PATHS = ("/health",)  # answered without the API key: load balancers and process managers probe it

try:
    import litserve as ls
    from fastapi import BackgroundTasks
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from litserve.specs.openai import ChatCompletionRequest, OpenAISpec
    from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator
except ImportError as err:  # the command without the extra: one line, no traceback
    raise SystemExit(print_error(f"serving needs LitServe and FastAPI ({first_line(err)}): {SERVE_EXTRA}")) from None

# LitServe warns that batch() and unbatch() go unused when a server runs with --max_batch_size 1; and that
# a LitAPI's __init__ took over a second when its class inherits `setup` (it looks for one of its own): ours
# load the weights in `setup`, and their __init__ reads the checkpoint's settings and the tokenizer.
warnings.filterwarnings("ignore", message="The LitServer has both batch and unbatch methods implemented")
warnings.filterwarnings("ignore", message=r".*\.__init__ took [0-9.]+ seconds to execute")

# The LitAPI of the running server, in the HTTP processes: the request models below check and
# convert bodies with it. serve() sets it before LitServe forks those processes (they inherit it).
SERVED = None


def cpu_threads(workers: int) -> int:
    """Threads per CPU worker: the cores but one (the HTTP process's), shared by the workers. More
    threads than free cores make each batch wait for the slowest (e.g. 8 ms instead of 0.3 ms for
    the default MLP with 2 threads on a busy 2-core machine)."""
    return max(1, ((os.cpu_count() or 1) - 1) // workers)


# ----------------------------------------------------------------------------------- requests


class ClassifyRequest(BaseModel):
    """`POST /predict` of a classifier: exactly one of `image`, `features`, `text` (the model's kind)."""

    model_config = ConfigDict(extra="forbid")
    image: str | None = None
    features: dict[str, Any] | None = None
    text: str | None = None
    _input: Any = PrivateAttr(None)  # the model input, made in the HTTP process, pickled to the worker

    @model_validator(mode="after")
    def convert(self):
        self._input = SERVED.read(self)  # a ValueError becomes a 422 naming the problem
        return self

    def prepared(self):
        """The model input that `convert` made from this request."""
        return self._input


class PromptRequest(BaseModel):
    """`POST /predict` of a language model trained from zero: a prompt to continue, and how to sample."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    max_tokens: int | None = Field(None, ge=1)  # None: up to the end of the context
    temperature: float = Field(1.0, ge=0)  # 0: always the most probable token
    top_p: float = Field(1.0, gt=0, le=1)

    @model_validator(mode="after")
    def check(self):
        self.max_tokens = SERVED.generator_budget(self.prompt, self.max_tokens)
        return self


# ------------------------------------------------------------------------------------ kinds


class ServedAPI(ls.LitAPI):
    """What every kind shares: built in the main process from the checkpoint's settings (cheap,
    checked, and inherited by the HTTP processes), the weights loaded by `setup` in each worker."""

    workers_per_device = 1

    def __init__(self, checkpoint: Path, hparams: dict, **batching):
        super().__init__(**batching)
        self.checkpoint, self.hparams = str(checkpoint), hparams

    def describe(self) -> str:
        """What the server answers, for the line printed at the start."""
        return "POST /predict"


class ClassifierAPI(ServedAPI):
    """An image or table classifier (`models.Classifier` and its subclasses)."""

    def __init__(self, checkpoint: Path, hparams: dict, **batching):
        super().__init__(checkpoint, hparams, **batching)
        self.load()  # a wrong or broken checkpoint: one ERROR line now, not a worker's traceback
        self.names = [str(n) for n in hparams.get("class_names") or range(int(hparams.get("num_classes") or 0))]
        self.shape = tuple(hparams.get("input_shape") or (1, 28, 28))
        self.features = hparams.get("feature_names")
        self.field = "image" if len(self.shape) == 3 else "features"

    def load(self, device: str = "cpu"):
        from .models import Classifier

        return load_model(Classifier, Path(self.checkpoint), compile=False).to(device)

    def describe(self) -> str:
        what = f"an image of {'x'.join(map(str, self.shape))}" if self.field == "image" else "features"
        return f"POST /predict with {what} -> {len(self.names)} classes"

    # HTTP process: the body as the model's input

    def read(self, request: ClassifyRequest) -> np.ndarray:
        given = [name for name in ("image", "features", "text") if getattr(request, name) is not None]
        if given != [self.field]:
            raise ValueError(f"send the field {self.field!r}: this model reads {self.field}s; got {given or 'none'}")
        return self.convert(getattr(request, self.field))

    def convert(self, value) -> np.ndarray:
        return read_image(value, self.shape) if self.field == "image" else self.read_features(value)

    def read_features(self, given: dict) -> np.ndarray:
        unknown = sorted(set(given) - set(self.features))
        missing = [name for name in self.features if name not in given]
        if unknown or missing:
            raise ValueError(
                f"features: {'unknown ' + str(unknown) if unknown else ''}{'; ' if unknown and missing else ''}"
                f"{'missing ' + str(missing) if missing else ''}; the model takes {self.features}"
            )
        values = []
        for name in self.features:
            value = given[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"features.{name}: {value!r} is not a finite number")
            values.append(value)
        return np.asarray(values, dtype=np.float32)

    # worker: batches of inputs through the model, as `predict` runs them

    def setup(self, device: str) -> None:
        import torch

        if device == "cpu":
            torch.set_num_threads(cpu_threads(self.workers_per_device))
        self.model = self.load(device).eval()
        self.model.on_predict_start()  # e.g. merges LoRA adapters, as `predict` does
        self.torch, self.device_name = torch, device

    def decode_request(self, request: ClassifyRequest) -> np.ndarray:
        return request.prepared()

    def batch(self, inputs: list[np.ndarray]):
        from .data.batches import model_input

        return model_input(self.torch.from_numpy(np.stack(inputs)))  # uint8 pixels / 255, as in training

    def predict(self, x):
        single = self.max_batch_size == 1  # LitServe then calls neither batch nor unbatch
        with self.torch.inference_mode():
            x = self.batch([x]) if single else x
            probabilities = self.model.predict_step((x.to(self.device_name),), 0).float().cpu()
        return probabilities[0] if single else probabilities

    def unbatch(self, output) -> list:
        return list(output)

    def encode_response(self, probabilities) -> dict:
        p = probabilities.tolist()
        k = max(range(len(p)), key=p.__getitem__)
        return {"class": self.names[k], "index": k, "probabilities": dict(zip(self.names, p))}


class RegressorAPI(ClassifierAPI):
    """A table model that predicts a number (`models.Regressor`): `{"value": v}` in the target's units."""

    def load(self, device: str = "cpu"):
        from .models import Regressor

        return load_model(Regressor, Path(self.checkpoint)).to(device)

    def describe(self) -> str:
        return f"POST /predict with features ({len(self.features or [])}) -> a value"

    def encode_response(self, value) -> dict:
        return {"value": float(value)}  # predict_step's value: already in the target's units


{% if cookiecutter.text == "yes" -%}
class TextClassifierAPI(ClassifierAPI):
    """A fine-tuned language model (`models.TextClassifier`): texts, tokenised by the model's tokenizer."""

    def __init__(self, checkpoint: Path, hparams: dict, **batching):
        super().__init__(checkpoint, hparams, **batching)
        from .data.text import TextDataModule

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the HTTP processes are forked
        self.field = "text"
        self.data = TextDataModule(tokenizer=hparams["model_name_or_path"], max_length=int(self.shape[-1]))
        _ = self.data.tokenizer  # loaded now: a missing folder is one ERROR line

    def load(self, device: str = "cpu"):
        from .models.text import TextClassifier

        return load_model(TextClassifier, Path(self.checkpoint)).to(device)

    def describe(self) -> str:
        return f"POST /predict with a text -> {len(self.names)} classes"

    def convert(self, text: str) -> np.ndarray:
        if not text.strip():
            raise ValueError("text: empty; send the text to classify")
        return self.data.encode([text])[0].numpy()  # token ids and mask, truncated as in training

    def batch(self, inputs: list[np.ndarray]):
        x = self.torch.from_numpy(np.stack(inputs))
        return x[:, :, : max(1, int(x[:, 1].sum(dim=1).max()))]  # cut the padding no text of the batch needs


class TextRegressorAPI(TextClassifierAPI):
    """A text model that predicts a number (`models.text_regressor.TextRegressor`): `{"value": v}`."""

    def load(self, device: str = "cpu"):
        from .models.text_regressor import TextRegressor

        return load_model(TextRegressor, Path(self.checkpoint)).to(device)

    def describe(self) -> str:
        return "POST /predict with a text -> a value"

    encode_response = RegressorAPI.encode_response


{% endif -%}
# ------------------------------------------------------------------------- generative kinds

Prompt = str | list[dict[str, str]]  # a text to continue, or chat messages [{"role": ..., "content": ...}]


class TextGenerator(Protocol):
    """What a generative part (a language model, a chat model) gives the server for one checkpoint.

    It is built in the main process from the checkpoint path, cheaply (tokenizer and settings,
    no weights), and copied to the HTTP processes, which count prompt tokens with it, and to the
    workers, which call `load` once and then `generate`.
    """

    context_length: int  # the most tokens the model reads: the prompt and the generated text

    def count_tokens(self, prompt: Prompt) -> int:
        """The prompt's length in tokens (for messages: after the chat template)."""

    def load(self, device: str) -> None:
        """Load the weights onto `device` (in the worker process)."""

    def generate(self, prompt: Prompt, max_tokens: int, temperature: float, top_p: float) -> Iterator[str]:
        """At most `max_tokens` new tokens, yielded as text pieces as they are sampled."""


class GenerativeAPI(ServedAPI):
    """What PromptAPI and ChatAPI share: the generator and the token budget. One request at a time
    per worker (generation is not batched here); more workers: --workers_per_device."""

    def __init__(self, checkpoint: Path, hparams: dict, generator: Callable[[Path], TextGenerator], **batching):
        super().__init__(checkpoint, hparams, **{**batching, "max_batch_size": 1, "batch_timeout": 0.0})
        self.generator = generator(Path(checkpoint))

    def generator_budget(self, prompt: Prompt, max_tokens: int | None) -> int:
        """`max_tokens`, or the rest of the context when None; a ValueError when the prompt does not fit."""
        text = prompt if isinstance(prompt, str) else "".join(str(m.get("content") or "") for m in prompt)
        if not text.strip():
            raise ValueError("the prompt is empty")
        used, context = self.generator.count_tokens(prompt), self.generator.context_length
        if max_tokens is None and used >= context:
            raise ValueError(f"the prompt is {used} tokens: no room left in the model's context of {context} tokens")
        if max_tokens is not None and used + max_tokens > context:
            raise ValueError(
                f"the prompt is {used} tokens and max_tokens {max_tokens}: more than the model's context of {context} "
                "tokens; shorten the prompt or lower max_tokens"
            )
        return context - used if max_tokens is None else max_tokens

    def setup(self, device: str) -> None:
        if device == "cpu":
            import torch

            torch.set_num_threads(cpu_threads(self.workers_per_device))
        self.generator.load(device)


class PromptAPI(GenerativeAPI):
    """`POST /predict {"prompt": ..., "max_tokens", "temperature", "top_p"}` -> `{"text": ...}` (a language
    model trained from zero)."""

    def decode_request(self, request: PromptRequest) -> PromptRequest:
        return request

    def predict(self, request: PromptRequest) -> str:
        g = self.generator.generate(request.prompt, request.max_tokens, request.temperature, request.top_p)
        return "".join(g)

    def encode_response(self, text: str) -> dict:
        return {"text": text}

    def describe(self) -> str:
        return f"POST /predict with a prompt (context {self.generator.context_length} tokens)"


class CheckedOpenAISpec(OpenAISpec):
    """LitServe's OpenAI spec, with the request checked in the HTTP process first: a bad request
    gets a 400, also when it asks for a stream (LitServe would send 200 and an error event). The
    body has OpenAI's `error` (its clients show the message) and this server's `detail`."""

    async def chat_completion(self, request: ChatCompletionRequest, background_tasks: BackgroundTasks):
        try:
            SERVED.check_chat(request)
        except ValueError as err:
            error = {"message": str(err), "type": "invalid_request_error", "param": None, "code": None}
            return JSONResponse({"error": error, "detail": str(err)}, status_code=400)
        return await super().chat_completion(request, background_tasks)


class ChatAPI(GenerativeAPI):
    """OpenAI-compatible `POST /v1/chat/completions` (streamed or not), for a chat model."""

    def __init__(self, checkpoint: Path, hparams: dict, generator: Callable[[Path], TextGenerator], **batching):
        super().__init__(checkpoint, hparams, generator, **batching)
        self._spec = CheckedOpenAISpec()
        self.stream = True

    def check_chat(self, request) -> None:
        if not request.messages:
            raise ValueError("messages: empty; send at least one {'role': 'user', 'content': '...'}")
        for i, message in enumerate(request.messages):
            if not isinstance(message.content, str):
                raise ValueError(f"messages[{i}].content: this model reads text only; send a string")
        if request.temperature is not None and request.temperature < 0:
            raise ValueError(f"temperature: {request.temperature} is negative")
        if request.top_p is not None and not 0 < request.top_p <= 1:
            raise ValueError(f"top_p: {request.top_p} is not in (0, 1]")
        limit = request.max_completion_tokens or request.max_tokens
        if limit is not None and limit < 1:
            raise ValueError(f"max_tokens: {limit}; give at least 1")
        self.generator_budget(self.messages(request), limit)

    @staticmethod
    def messages(request) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in request.messages]

    def predict(self, request) -> Iterator[str]:
        messages = self.messages(request)
        limit = self.generator_budget(messages, request.max_completion_tokens or request.max_tokens)
        temperature = 1.0 if request.temperature is None else request.temperature
        yield from self.generator.generate(messages, limit, temperature, request.top_p or 1.0)

    def describe(self) -> str:
        return f"POST /v1/chat/completions (OpenAI-compatible; context {self.generator.context_length} tokens)"


{% if cookiecutter.gpt == "yes" -%}
class GPTGenerator:
    """A GPT trained from zero (models/lm.py), for `PromptAPI`: loaded by generate.py, sampled with the
    network's KV cache, its text given piece by piece as `python -m {{ cookiecutter.package_name }}.generate` prints it."""

    def __init__(self, checkpoint: Path):
        from .generate import load

        self.checkpoint, self.network = checkpoint, None
        network, self.tokenizer = load(checkpoint)  # now: a broken file is one ERROR line, not a worker's traceback
        self.context_length = network.block_size  # the positions the network has embeddings for

    def count_tokens(self, prompt: str) -> int:
        try:
            return len(self.tokenizer.encode(prompt, "prompt"))
        except UserError as err:  # a character the char vocabulary lacks: the request's mistake (a 422)
            raise ValueError(str(err)) from None

    def load(self, device: str) -> None:
        from .generate import load

        self.network = load(self.checkpoint)[0].to(device)

    def generate(self, prompt: str, max_tokens: int, temperature: float, top_p: float) -> Iterator[str]:
        import torch

        from .generate import text_pieces

        ids = torch.tensor([self.tokenizer.encode(prompt)], device=self.network.lm_head.weight.device)
        steps = self.network.generate(ids, max_tokens, temperature, None, top_p if top_p < 1 else None)
        yield from text_pieces(steps, self.tokenizer)


{% endif -%}
{% if cookiecutter.chat == "yes" -%}
class ChatGenerator:
    """A chat fine-tune (models/chat.py), for `ChatAPI`: loaded by chat_generate.py, prompted with the chat
    template its checkpoint holds, answering through `chat_reply` (as the command and the Text tab do)."""

    def __init__(self, checkpoint: Path):
        from .chat_template import CHAT_EXTRA, use_template
        from .pretrained import load_tokenizer, transformers

        # The HTTP processes count tokens: the tokenizer with the checkpoint's template, as the model has it
        # (models/chat.py), and the context from the model's config; the weights are the worker's alone.
        self.checkpoint, self.model = checkpoint, None
        h = read_checkpoint(checkpoint, f"--ckpt_path={checkpoint}").get("hyper_parameters") or {}
        self.tokenizer = use_template(load_tokenizer(h.get("model_name_or_path"), CHAT_EXTRA), h.get("chat_template"))
        config = transformers(CHAT_EXTRA).AutoConfig.from_pretrained(h["model_name_or_path"])
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or self.tokenizer.model_max_length)

    def count_tokens(self, prompt: Prompt) -> int:
        from jinja2 import TemplateError

        from .chat_template import prompt_ids

        try:
            return len(prompt_ids(self.tokenizer, prompt))
        except TemplateError as err:  # e.g. a template that wants user and assistant turns to alternate
            raise ValueError(f"messages: the model's chat template refuses them ({first_line(err)})") from None

    def load(self, device: str) -> None:
        from .chat_generate import load_chat_model

        self.model = load_chat_model(str(self.checkpoint)).to(device)

    def generate(self, prompt: Prompt, max_tokens: int, temperature: float, top_p: float) -> Iterator[str]:
        """The answer's pieces as `chat_reply` streams them: it runs in a thread and hands them over a queue."""
        import queue
        import threading

        from .models.chat import chat_reply

        pieces: queue.Queue = queue.Queue()

        def answer():
            try:
                chat_reply(self.model, prompt, max_tokens, temperature, None, top_p if top_p < 1 else None,
                           on_text=pieces.put)  # fmt: skip
                pieces.put(None)
            except BaseException as err:  # raised again below, in the worker's own thread
                pieces.put(err)

        threading.Thread(target=answer, daemon=True).start()
        while (piece := pieces.get()) is not None:
            if isinstance(piece, BaseException):
                raise piece
            yield piece


{% endif -%}
# The model class (its name, or a base class's) -> the LitAPI that serves its checkpoints, called
# as KIND(checkpoint, hparams, max_batch_size=..., batch_timeout=...). A generative kind is a
# PromptAPI or a ChatAPI with the part's TextGenerator.
KINDS: dict[str, Callable[..., ServedAPI]] = {
{%- if cookiecutter.text == "yes" %}
    "TextClassifier": TextClassifierAPI,
    "TextRegressor": TextRegressorAPI,
{%- endif %}
{%- if cookiecutter.gpt == "yes" %}
    "GPTModule": functools.partial(PromptAPI, generator=GPTGenerator),
{%- endif %}
{%- if cookiecutter.chat == "yes" %}
    "ChatModel": functools.partial(ChatAPI, generator=ChatGenerator),
{%- endif %}
    "Classifier": ClassifierAPI,
    "Regressor": RegressorAPI,
}


def model_kind(hparams: dict) -> str | None:
    """The KINDS entry for a checkpoint: its model class (`_class_path`, saved by the command line),
    or the first of its base classes that has one."""
    module, _, name = str(hparams.get("_class_path") or "").rpartition(".")
    if module.split(".")[0] == __package__ and module not in sys.modules:
        importlib.import_module(module)  # our own code; read_checkpoint refused any other module
    found = getattr(sys.modules.get(module), name, None)
    if isinstance(found, type):
        return next((c.__name__ for c in found.__mro__ if c.__name__ in KINDS), None)
{%- if cookiecutter.text == "yes" %}
    if not name:  # saved without the command line: tell a text model by its settings
        name = "TextClassifier" if "model_name_or_path" in hparams else "Classifier"
{%- else %}
    name = name or "Classifier"  # saved without the command line
{%- endif %}
    return name if name in KINDS else None


# ----------------------------------------------------------------------------------- images


def read_image(data: str, shape: tuple[int, ...]) -> np.ndarray:
    """Base64 PNG / JPEG (a `data:` URL prefix is allowed) -> uint8 (channels, height, width), as
    training reads image files: mode 'L' (1 channel) or 'RGB' (3); the size must be the model's."""
    from PIL import Image, UnidentifiedImageError

    channels, height, width = shape
    try:
        raw = base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data, validate=True)
        image = Image.open(io.BytesIO(raw))
    except (binascii.Error, ValueError):
        raise ValueError("image: not base64 text; send the file's bytes base64-encoded") from None
    except (UnidentifiedImageError, OSError):
        raise ValueError("image: not a readable image; send a PNG or JPEG file, base64-encoded") from None
    if image.size != (width, height):  # checked before the pixels are decoded
        raise ValueError(f"image: {image.size[0]}x{image.size[1]} pixels, but the model takes {width}x{height}")
    try:
        image = image.convert("RGB") if channels == 3 or image.mode not in ("1", "L", "LA", "I", "I;16") else image
        if channels == 1 and image.mode == "RGB":
            r, g, b = (np.asarray(band) for band in image.split())
            if not (np.array_equal(r, g) and np.array_equal(g, b)):
                raise ValueError(
                    f"image: in colour (3 channels), but the model takes grayscale ({channels} channel); "
                    "convert it to grayscale first (as training with --data.grayscale=true did)"
                )
        image = image.convert("L" if channels == 1 else "RGB")
    except OSError as err:  # a truncated file shows when the pixels are decoded
        raise ValueError(f"image: the file is damaged ({first_line(err)})") from None
    if channels not in (1, 3):
        raise ValueError(f"image: the model takes {channels} channels; only 1 (grayscale) and 3 (RGB) are served")
    pixels = np.asarray(image, dtype=np.uint8).reshape(height, width, channels)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


# ------------------------------------------------------------------------------- HTTP layer


async def reply(send, status: int, message: str, headers: tuple = ()) -> None:
    body = json.dumps({"detail": message}).encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware in front of LitServe: the API key, then the body size limit (the whole body
    is read first, up to the limit, and handed on)."""

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        bearer = headers.get(b"authorization", b"")
        given = bearer[7:] if bearer[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        return hmac.compare_digest(given, self.api_key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in OPEN_PATHS and not self.authorized(headers):
            hint = "send the header 'Authorization: Bearer <key>' (or 'X-API-Key: <key>') with the server's --api_key"
            return await reply(send, 401, f"missing or wrong API key: {hint}", ((b"www-authenticate", b"Bearer"),))
        too_large = f"the request body is over the server's limit of {self.max_bytes} bytes (--max_body_mb)"
        if int(headers.get(b"content-length", b"0") or 0) > self.max_bytes:
            return await reply(send, 413, too_large)
        body, more = b"", scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await reply(send, 413, too_large)
        handed = False

        async def replay():
            nonlocal handed
            if handed:
                return await receive()  # after the body: a disconnect, for streamed answers
            handed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def invalid_request(request, err: "RequestValidationError"):
    """FastAPI's list of validation errors as one line; malformed JSON is a 400, the rest 422."""
    problems = []
    for e in err.errors():
        where = ".".join(str(part) for part in e.get("loc", ())[1:])
        message = str(e.get("msg", "")).removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where and e.get("type") != "value_error" else message)
    status = 400 if any(e.get("type") == "json_invalid" for e in err.errors()) else 422
    if status == 400:
        problems = ['malformed JSON: the body is not valid JSON; send an object such as {"image": "..."}']
    return JSONResponse({"detail": "; ".join(problems)}, status_code=status)


# ------------------------------------------------------------------------------ the command


def stop_on_sigterm() -> None:
    """SIGTERM (a process manager, `docker stop`) stops the server as Ctrl+C does: LitServe then
    ends its HTTP processes and workers. Processes forked from this one inherit the handler; they
    keep the default (exit)."""
    main_pid = os.getpid()

    def handler(number, frame):
        if os.getpid() != main_pid:
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def build_api(args) -> ServedAPI:
    from .cli import resolve_checkpoint

    path = resolve_checkpoint(args.ckpt_path, Path(args.log_dir))
    hparams = dict(read_checkpoint(path, f"--ckpt_path={path}").get("hyper_parameters") or {})
    kind = model_kind(hparams)
    if kind is None:
        saved = hparams.get("_class_path") or "an unknown model"
        raise UserError(f"--ckpt_path={path}: {saved} cannot be served; serve knows {', '.join(KINDS)}")
    return KINDS[kind](path, hparams, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)


def check_options(args) -> None:
    if args.host not in HOSTS:
        raise UserError(f"--host={args.host}: give 127.0.0.1 (this machine only), 0.0.0.0 or :: (all interfaces)")
    if not 1024 <= args.port <= 65535:
        raise UserError(f"--port={args.port}: give a port from 1024 to 65535")
    for name in ("max_batch_size", "workers_per_device"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name}={getattr(args, name)}: give at least 1")
    if args.batch_timeout < 0 or args.max_body_mb <= 0:
        raise UserError("--batch_timeout must be at least 0 and --max_body_mb more than 0")
    if args.accelerator == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--accelerator=cuda, but PyTorch sees no GPU here: use --accelerator=cpu (or auto)")
    if args.host != "127.0.0.1" and not args.api_key:
        print(
            f"WARNING: --host {args.host} without --api_key: anyone who can reach this machine can use the model; "
            "give --api_key KEY (or keep the default --host 127.0.0.1 behind a proxy)",
            file=sys.stderr,
            flush=True,
        )


def serve(args) -> None:
    global SERVED
    check_options(args)
    SERVED = api = build_api(args)
    api.workers_per_device = args.workers_per_device
    server = ls.LitServer(
        api,
        accelerator=args.accelerator,
        workers_per_device=args.workers_per_device,
        middlewares=[(Guard, {"api_key": args.api_key, "max_bytes": int(args.max_body_mb * 2**20)})],
    )
    server.app.add_exception_handler(RequestValidationError, invalid_request)
    print(f"Serving {api.checkpoint} at http://{args.host}:{args.port}: {api.describe()}; GET /health", flush=True)
    stop_on_sigterm()
    try:
        server.run(host=args.host, port=args.port, generate_client_file=False, log_level=args.log_level)
    except KeyboardInterrupt:  # stopped while the workers were starting: LitServe has not cleaned up
        pass
    except RuntimeError as err:  # LitServe: a worker could not set up (e.g. out of GPU memory)
        raise UserError(f"{first_line(err)}: a worker could not load the model; its traceback is above") from None
    finally:
        for worker in getattr(server, "inference_workers", []):
            if worker.is_alive():
                worker.terminate()
                worker.join(5)
    print("Server stopped.", flush=True)


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m {{ cookiecutter.package_name }}.serve",
        description="Serve a checkpoint's model over HTTP (LitServe), with batching.",
    )
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt file written by fit, or best / last")
    parser.add_argument("--log_dir", default="logs", help="where best / last are looked for (default: logs)")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default: this machine only), 0.0.0.0 or ::")
    parser.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    parser.add_argument("--max_batch_size", type=int, default=8, help="requests run together (default: 8)")
    parser.add_argument(
        "--batch_timeout", type=float, default=0.005, help="seconds a batch waits to fill (default: 0.005)"
    )
    parser.add_argument("--workers_per_device", type=int, default=1, help="model copies per device (default: 1)")
    parser.add_argument("--accelerator", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    parser.add_argument("--api_key", default=os.environ.get("SERVE_API_KEY"), help="required of every request "
                        "(default: the SERVE_API_KEY environment variable; none: no key)")  # fmt: skip
    parser.add_argument("--max_body_mb", type=float, default=1.0, help="largest request body (default: 1 MB)")
    parser.add_argument("--log_level", choices=["warning", "info", "debug"], default="warning",
                        help="info: a line per request (default: warning)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        serve(args)
    except UserError as err:
        return print_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
