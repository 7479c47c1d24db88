"""Serving the GPT trained from zero (the gpt part): a tiny GPT fitted as tests/test_gpt.py fits it, a real
server in a subprocess on a free loopback port, `POST /predict {"prompt": ...}` over HTTP. Greedy text
equals `python -m {{ cookiecutter.package_name }}.generate`'s; sampled text has `max_tokens` tokens of the corpus;
a prompt the model cannot take gets a 422 naming why, and the next request is answered."""

import pytest

pytest.importorskip("litserve", reason="the serve extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the dev extra is not installed: pip install -e '.[dev]'")

from serving import Server  # noqa: E402
from test_gpt import CONFIG, TINY, write_text  # noqa: E402

from {{ cookiecutter.package_name }} import serve  # noqa: E402
from {{ cookiecutter.package_name }}.cli import main  # noqa: E402
from {{ cookiecutter.package_name }}.generate import main as generate  # noqa: E402

CONTEXT = 16  # TINY's --data.block_size


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(the best checkpoint of a tiny GPT fitted on a text with Chinese in it, the text)."""
    folder = tmp_path_factory.mktemp("gpt")
    corpus = write_text(folder / "zh.txt")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        main(["fit", f"--config={CONFIG}", *TINY, f"--data.path={corpus}"])
    return folder / "logs" / "gpt_char" / "version_0" / "checkpoints" / "best.ckpt", corpus.read_text()


@pytest.fixture(scope="module")
def server(trained):
    best, _ = trained
    started = Server(best.parents[4], "--ckpt_path", str(best)).start()
    yield started
    started.kill()


def ask(server: Server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/predict", json=body, timeout=60)


def test_greedy_text_over_http_equals_the_generate_command(server, trained, capsys):
    best, _ = trained
    assert f"POST /predict with a prompt (context {CONTEXT} tokens)" in server.output()
    for prompt, tokens in (("我们", 9), ("the cat ", 8), ("模型", CONTEXT - 2)):
        answer = ask(server, prompt=prompt, max_tokens=tokens, temperature=0)
        assert answer.status_code == 200, answer.text
        generate(["--ckpt_path", str(best), "--prompt", prompt, "--max_new_tokens", str(tokens), "--temperature=0"])
        printed = capsys.readouterr().out
        assert answer.json() == {"text": printed.removeprefix(prompt).removesuffix("\n")}
        assert len(answer.json()["text"]) == tokens  # a char vocabulary: one character per token
    unset = ask(server, prompt="我们学习", temperature=0).json()["text"]  # no max_tokens: the rest of the context
    assert len(unset) == CONTEXT - 4


def test_sampled_text_keeps_to_the_settings(server, trained):
    _, corpus = trained
    texts = [ask(server, prompt="the ", max_tokens=10, temperature=1.0, top_p=0.9).json()["text"] for _ in range(4)]
    assert [len(t) for t in texts] == [10] * 4 and set("".join(texts)) <= set(corpus)
    assert len(set(texts)) > 1  # sampled, not greedy


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"prompt": "the cat sat on a"}, f"the prompt is 16 tokens: no room left in the model's context of {CONTEXT}"),
        ({"prompt": "the cat", "max_tokens": 10}, "the prompt is 7 tokens and max_tokens 10: more than the model's"),
        ({"prompt": "Zebra"}, "prompt has characters the char vocabulary lacks ('Zbr')"),
        ({"prompt": ""}, "the prompt is empty"),
        ({"prompt": "the", "temperature": -0.5}, "temperature: Input should be greater than or equal to 0"),
        ({"text": "the"}, "prompt: Field required"),
    ],
)
def test_a_prompt_the_model_cannot_take_gets_a_422_and_the_next_is_answered(server, body, words):
    refused = ask(server, **body)
    assert refused.status_code == 422 and words in refused.json()["detail"], refused.text
    assert len(ask(server, prompt="the", max_tokens=3).json()["text"]) == 3


def test_the_kind_is_chosen_by_the_model_class(trained):
    best, _ = trained
    api = serve.build_api(serve.parse(["--ckpt_path", str(best)]))
    assert isinstance(api, serve.PromptAPI) and isinstance(api.generator, serve.GPTGenerator)
    assert api.generator.network is None and api.generator.context_length == CONTEXT  # the weights: in the worker
