"""The generative side of `serve`, with a stand-in generator (tests/standin.py) in place of a language model or a
chat model: the OpenAI-compatible `/v1/chat/completions` of a real server, streamed and not, its
4xx answers, and the prompt route's checks (`POST /predict {"prompt": ...}`)."""

import json

import pytest
import torch

pytest.importorskip("litserve", reason="the serve extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the dev extra is not installed: pip install -e '.[dev]'")

import standin  # noqa: E402
from conftest import ROOT  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from serving import Server  # noqa: E402

from {{ cookiecutter.package_name }} import serve  # noqa: E402

KEY = "chat-key"
CHAT = "/v1/chat/completions"


def checkpoint(folder, model_class: str):
    path = folder / f"{model_class}.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": f"standin.{model_class}"}}, path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    script = [str(ROOT / "tests" / "standin.py")]
    started = Server(folder, "--ckpt_path", str(checkpoint(folder, "EchoChat")), api_key=KEY, script=script).start()
    yield started
    started.kill()


def chat(server: Server, **body) -> httpx.Response:
    body = {"model": "echo", "messages": [{"role": "user", "content": "one two three"}], **body}
    return httpx.post(server.url + CHAT, json=body, headers=server.headers, timeout=60)


def test_a_chat_completion_goes_through_the_generator_with_its_settings(server):
    answer = chat(server, max_tokens=3, temperature=0.5, top_p=0.9)
    assert answer.status_code == 200
    body = answer.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "<0.5 0.9 cpu> three two", "name": None,
                                             "tool_calls": None, "tool_call_id": None}  # fmt: skip


def test_a_streamed_chat_completion_sends_the_same_pieces_as_events(server):
    with httpx.stream("POST", server.url + CHAT, headers=server.headers, timeout=60, json={
        "model": "echo", "messages": [{"role": "user", "content": "one two three"}], "stream": True,
        "temperature": 0.0, "max_completion_tokens": 10,
    }) as answer:  # fmt: skip
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in answer.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks if c["choices"][0]["delta"]["content"]]
    assert pieces == ["<0.0 1.0 cpu>", " three", " two", " one"]  # one event per piece, as generated
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"messages": [{"role": "user", "content": " ".join(["word"] * 16)}]}, 400, "no room left in the model's"),
        ({"messages": [{"role": "user", "content": "a b"}], "max_tokens": 15}, 400, "more than the model's context"),
        ({"messages": [{"role": "user", "content": "w " * 20}], "stream": True}, 400, "context of 16 tokens"),
        ({"messages": []}, 400, "messages: empty"),
        ({"messages": [{"role": "user", "content": " "}]}, 400, "the prompt is empty"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature: -1"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p: 0"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, 400, "text only"),
        ({"model": "echo"}, 422, "messages: Field required"),
    ],
)
def test_bad_chat_requests_get_a_4xx_even_when_streamed_and_the_next_is_answered(server, body, status, words):
    answer = httpx.post(server.url + CHAT, json=body, headers=server.headers, timeout=60)
    assert answer.status_code == status and words in answer.json()["detail"]
    assert chat(server, max_tokens=2).json()["choices"][0]["message"]["content"] == "<0.7 1.0 cpu> three"


def test_malformed_json_and_a_missing_key_on_the_chat_route(server):
    garbled = httpx.post(
        server.url + CHAT, content=b'{"messages": [', headers={**server.headers, "Content-Type": "application/json"}
    )
    assert garbled.status_code == 400 and "malformed JSON" in garbled.json()["detail"]
    assert httpx.post(server.url + CHAT, json={"messages": []}).status_code == 401


def test_the_prompt_route_checks_prompts_against_the_context(tmp_path, monkeypatch):
    """`PromptAPI` in this process: its request model (what the HTTP process runs) and a worker's answer."""
    standin.register(serve)
    args = serve.parse(["--ckpt_path", str(checkpoint(tmp_path, "EchoLM")), "--max_batch_size", "8"])
    api = serve.build_api(args)
    assert isinstance(api, serve.PromptAPI) and api.max_batch_size == 1  # generation is not batched
    monkeypatch.setattr(serve, "SERVED", api)
    request = serve.PromptRequest(prompt="to be or not", temperature=0.2)
    assert request.max_tokens == 16 - 4  # unset: the rest of the context
    for given, words in [
        ({"prompt": "w " * 16}, "the prompt is 16 tokens: no room left in the model's context of 16 tokens"),
        ({"prompt": "a b", "max_tokens": 15}, "more than the model's context"),
        ({"prompt": "  "}, "the prompt is empty"),
        ({"prompt": "a", "max_tokens": 0}, "greater than or equal to 1"),
        ({"prompt": "a", "top_p": 1.5}, "less than or equal to 1"),
        ({"text": "a"}, "prompt"),
    ]:
        with pytest.raises(ValidationError, match=words):
            serve.PromptRequest(**given)
    api.setup("cpu")
    answer = api.encode_response(api.predict(api.decode_request(serve.PromptRequest(prompt="a b c", max_tokens=3))))
    assert answer == {"text": "<1.0 1.0 cpu> c b"}
