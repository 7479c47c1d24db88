"""Serving a chat fine-tune (the chat part): a real server in a subprocess on a free loopback port, asked
over the OpenAI-compatible `POST /v1/chat/completions`, streamed and not. The fast tests fit the tiny
Llama of tests/chatdata.py with LoRA: greedy answers equal `chat_reply`'s (what chat_generate prints),
and a stream's pieces make the same answer. The slow test serves the real SmolLM2-135M-Instruct."""

import json
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("litserve", reason="the serve extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the dev extra is not installed: pip install -e '.[dev]'")
pytest.importorskip("transformers", reason="the chat extra is not installed: pip install -e '.[chat]'")
pytest.importorskip("peft", reason="the chat extra is not installed: pip install -e '.[chat]'")

from chatdata import CONVERSATIONS, SMOLLM2_INSTALL, missing_real_data, smollm2, tiny_chat_model, write_jsonl  # noqa: E402
from conftest import ROOT  # noqa: E402
from serving import Server  # noqa: E402

from {{ cookiecutter.package_name }} import serve  # noqa: E402
from {{ cookiecutter.package_name }}.chat_generate import load_chat_model  # noqa: E402
from {{ cookiecutter.package_name }}.cli import run  # noqa: E402
from {{ cookiecutter.package_name }}.models.chat import chat_reply  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

CHAT = "/v1/chat/completions"
QUESTION = [{"role": "user", "content": "What is two plus two?"}]
CONVERSATION = CONVERSATIONS[2]["messages"][:-1]  # a system message and three turns; the model answers the last


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    """The best checkpoint of the tiny chat model after two epochs of LoRA (as tests/test_chat.py fits it)."""
    folder = tmp_path_factory.mktemp("chat")
    tiny = tiny_chat_model(folder / "tiny-chat")
    data = folder / "chats"
    data.mkdir()
    write_jsonl(data / "train.jsonl", CONVERSATIONS, repeat=6)
    write_jsonl(data / "val.jsonl", CONVERSATIONS)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        run(["fit", "--config", str(ROOT / "configs" / "sft_lora.yaml"), f"--model.model_name_or_path={tiny}",
             f"--data.path={data}", "--data.batch_size=4", "--model.lr=0.01", "--model.warmup_steps=0",
             "--model.sample_max_new_tokens=0", "--trainer.max_epochs=2", "--trainer.num_sanity_val_steps=0",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])  # fmt: skip
    return folder / "logs" / "sft_lora" / "version_0" / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def server(tuned):
    started = Server(tuned.parent, "--ckpt_path", str(tuned)).start()
    yield started
    started.kill()


def complete(server: Server, messages: list[dict], **settings) -> str:
    body = {"model": "served", "messages": messages, **settings}
    answer = httpx.post(server.url + CHAT, json=body, headers=server.headers, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["message"]["content"]


def stream(server: Server, messages: list[dict], **settings) -> list[str]:
    """The content pieces of a streamed completion, one per server-sent event."""
    body = {"model": "served", "messages": messages, "stream": True, **settings}
    with httpx.stream("POST", server.url + CHAT, json=body, headers=server.headers, timeout=120) as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in answer.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e)["choices"][0]["delta"]["content"] or "" for e in events[:-1]]


def test_greedy_answers_equal_chat_reply_streamed_or_not(server, tuned):
    model = load_chat_model(str(tuned))
    assert f"POST /v1/chat/completions (OpenAI-compatible; context {model.model.config.max_position_embeddings}" in (
        server.output()
    )
    for messages, tokens in ((QUESTION, 8), (CONVERSATION, 12)):
        expected = chat_reply(model, messages, tokens, temperature=0.0)
        assert expected.strip()  # fitted: it says something
        assert complete(server, messages, max_tokens=tokens, temperature=0) == expected
        pieces = stream(server, messages, max_completion_tokens=tokens, temperature=0)
        assert "".join(pieces) == expected and len([p for p in pieces if p]) >= 1


def test_sampled_answers_and_a_prompt_over_the_context(server, tuned):
    sampled = {complete(server, QUESTION, max_tokens=6, temperature=1.5, top_p=0.95) for _ in range(4)}
    assert len(sampled) > 1  # sampled, not greedy
    context = load_chat_model(str(tuned)).model.config.max_position_embeddings
    too_long = [{"role": "user", "content": "two plus two " * context}]
    refused = httpx.post(server.url + CHAT, json={"model": "served", "messages": too_long, "stream": True}, timeout=60)
    assert refused.status_code == 400 and f"context of {context} tokens" in refused.json()["detail"]
    assert complete(server, QUESTION, max_tokens=4, temperature=0)  # the next is answered


def test_the_kind_is_chosen_by_the_model_class(tuned):
    api = serve.build_api(serve.parse(["--ckpt_path", str(tuned)]))
    assert isinstance(api, serve.ChatAPI) and isinstance(api.generator, serve.ChatGenerator)
    assert api.generator.model is None  # the weights: loaded in the worker
    rendered = api.generator.tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=True)
    assert api.generator.count_tokens(CONVERSATION) == len(rendered["input_ids"]) > 20  # with the chat template


@pytest.mark.slow
def test_smollm2_answers_over_the_openai_route(tmp_path_factory, tmp_path):
    """SmolLM2-135M-Instruct behind the server: a LoRA checkpoint whose adapters are still zero (so the model is
    SmolLM2 itself) written as `fit` writes one, asked a question an OpenAI client would send."""
    missing = missing_real_data()
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: {SMOLLM2_INSTALL}")
    cache = tmp_path_factory.getbasetemp().parent / "chat-model-cache"  # shared with test_chat_smollm2.py
    cache.mkdir(exist_ok=True)
    folder = smollm2(cache)
    started = time.monotonic()
    from lightning import __version__

    from {{ cookiecutter.package_name }}.models.chat import ChatModel, is_lora

    model = ChatModel(model_name_or_path=str(folder))
    model.configure_model()  # the LoRA adapters (B = 0) and the tokenizer's chat template in the settings
    hparams = {**model.hparams, "_class_path": "{{ cookiecutter.package_name }}.models.chat.ChatModel"}
    state = {k: v for k, v in model.state_dict().items() if is_lora(k)}
    path = tmp_path / "smollm2.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hparams, "pytorch-lightning_version": __version__}, path)

    server = Server(tmp_path, "--ckpt_path", str(path), api_key="sk-local").start()
    try:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        answer = complete(server, messages, max_tokens=24, temperature=0)
        assert "Paris" in answer, answer
        assert "".join(stream(server, messages, max_tokens=24, temperature=0)) == answer
        assert server.stop() == (0, [])
    finally:
        server.kill()
    print(f"SmolLM2 served: {answer!r} ({time.monotonic() - started:.1f} s with the server's start)")
