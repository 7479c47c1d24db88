"""`python -m {{ cookiecutter.package_name }}.serve`: a real server (one per module, in a subprocess, on a free
loopback port) for the default model after a short `fit`, asked over real HTTP: the answers equal
`predict`'s, concurrent requests all get theirs, bad requests get a 4xx alone, the API key, SIGTERM.
The table classifier's reading of requests and its batches are checked in this process."""

import base64
import csv
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("litserve", reason="the serve extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the dev extra is not installed: pip install -e '.[dev]'")

from conftest import ROOT, write_numbers, write_table  # noqa: E402
from PIL import Image  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from serving import Server, group_members  # noqa: E402

from {{ cookiecutter.package_name }} import serve  # noqa: E402
from {{ cookiecutter.package_name }}.cli import run  # noqa: E402
from {{ cookiecutter.package_name }}.data import MNISTDataModule  # noqa: E402
from {{ cookiecutter.package_name }}.errors import load_model  # noqa: E402
from {{ cookiecutter.package_name }}.models import Classifier  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
KEY = "test-key"


def png(pixels: np.ndarray) -> str:
    """uint8 (height, width) or (height, width, 3) as base64 PNG."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The default run (the shipped digits, an MLP) trained for one epoch, and `predict` of its best checkpoint."""
    folder = tmp_path_factory.mktemp("served")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        run(["fit", "--trainer.max_epochs=1", *QUIET])
        run(["predict", "--ckpt_path=best", *QUIET])
    return folder


@pytest.fixture(scope="module")
def started(trained):
    server = Server(trained, "--ckpt_path", "best", "--max_batch_size", "8", api_key=KEY)
    yield server
    server.kill()


@pytest.fixture
def server(started) -> Server:
    """The module's server, started again if a test stopped it."""
    return started if started.alive() else started.start()


@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    data = MNISTDataModule(name="digits")
    data.setup("test")
    return data.splits["test"][0]  # uint8 (N, 1, 8, 8): what `predict` classified


def post_all(server: Server, bodies: list, workers: int) -> list:
    """POST every body at once from `workers` threads (concurrent requests), in order."""
    # A connection for each thread (httpx keeps 100 by default: the rest would queue in the client).
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    with httpx.Client(headers=server.headers, timeout=120, limits=limits) as client:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda body: client.post(f"{server.url}/predict", json=body), bodies))


def test_answers_equal_predicts_for_the_test_images_in_any_batch(server, trained, test_images):
    best = next(trained.glob("logs/digits_mlp/version_0/checkpoints/best.ckpt"))
    with open(trained / "logs" / "digits_mlp" / "version_0" / "predictions.csv", newline="") as f:
        predicted = list(csv.DictReader(f))
    assert len(predicted) == len(test_images) > 100

    answers = post_all(server, [{"image": png(x[0].numpy())} for x in test_images], workers=32)
    assert [a.status_code for a in answers] == [200] * len(test_images)
    model = load_model(Classifier, best)
    with torch.no_grad():
        expected = model.predict_step((test_images.float() / 255,), 0)
    names = model.hparams.class_names
    for answer, row, p in zip(answers, predicted, expected):
        body = answer.json()
        assert body["class"] == row["predicted"] == names[body["index"]]
        assert body["probabilities"][body["class"]] == pytest.approx(float(row["probability"]), abs=1e-5)
        assert list(body["probabilities"]) == names
        assert list(body["probabilities"].values()) == pytest.approx(p.tolist(), abs=1e-5)


def test_200_concurrent_requests_get_200_answers(server, test_images):
    bodies = [{"image": png(test_images[i % len(test_images), 0].numpy())} for i in range(200)]
    answers = post_all(server, bodies, workers=200)
    assert [a.status_code for a in answers] == [200] * 200
    first = [a.json()["probabilities"] for a in answers[: len(test_images)]]
    again = [a.json()["probabilities"] for a in answers[len(test_images) :]]
    for p, q in zip(first, again):  # the same image gives the same answer whatever batch it fell in
        assert list(p.values()) == pytest.approx(list(q.values()), abs=1e-5)


BAD = [
    # (content or JSON body, status, words of the message)
    (b'{"image": "iVBOR', 400, "malformed JSON"),
    ({}, 422, "send the field 'image'"),
    ({"text": "a digit"}, 422, "send the field 'image'"),
    ({"image": base64.b64encode(b"not an image at all").decode()}, 422, "not a readable image"),
    ({"image": "%%%"}, 422, "not base64"),
    ({"image": png(np.zeros((9, 8), np.uint8))}, 422, "8x9 pixels, but the model takes 8x8"),
    ({"image": png(np.dstack([np.full((8, 8), c, np.uint8) for c in (200, 10, 10)]))}, 422, "in colour"),
    ({"image": png(np.zeros((8, 8), np.uint8)), "label": 3}, 422, "label: Extra inputs"),
    ({"image": "A" * (2**20 + 8)}, 413, "over the server's limit"),
]


@pytest.mark.parametrize(("body", "status", "words"), BAD, ids=[words for _, _, words in BAD])
def test_a_bad_request_gets_a_4xx_naming_it_and_the_next_is_answered(server, test_images, body, status, words):
    with httpx.Client(headers=server.headers, timeout=60) as client:
        if isinstance(body, bytes):
            answer = client.post(f"{server.url}/predict", content=body, headers={"Content-Type": "application/json"})
        else:
            answer = client.post(f"{server.url}/predict", json=body)
        assert answer.status_code == status
        assert words in answer.json()["detail"]
        good = client.post(f"{server.url}/predict", json={"image": png(test_images[0, 0].numpy())})
    assert good.status_code == 200 and len(good.json()["probabilities"]) == 10


def test_bad_requests_among_concurrent_good_ones_fail_alone(server, test_images):
    good = [{"image": png(x[0].numpy())} for x in test_images[:40]]
    bad = [{"image": png(np.zeros((4, 4), np.uint8))}] * 40
    answers = post_all(server, [b for pair in zip(good, bad) for b in pair], workers=40)
    assert [a.status_code for a in answers] == [200, 422] * 40  # batched together, yet answered apart
    alone = post_all(server, good[:5], workers=1)  # one at a time: batches of one
    for a, b in zip(alone, answers[:10:2]):
        assert a.json()["class"] == b.json()["class"]
        assert list(a.json()["probabilities"].values()) == pytest.approx(list(b.json()["probabilities"].values()))


def test_the_api_key_is_required_but_for_health(server, test_images):
    body = {"image": png(test_images[0, 0].numpy())}
    assert httpx.post(f"{server.url}/predict", json=body).status_code == 401
    wrong = httpx.post(f"{server.url}/predict", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "--api_key" in wrong.json()["detail"]
    assert httpx.get(f"{server.url}/info").status_code == 401
    assert httpx.post(f"{server.url}/predict", json=body, headers={"X-API-Key": KEY}).status_code == 200
    assert httpx.get(f"{server.url}/health").text == "ok"  # probes of process managers need no key


def test_sigterm_stops_the_server_and_every_process_it_started(server):
    assert len(group_members(server.process.pid)) >= 3  # the server, its HTTP process and its inference worker at least
    code, left = server.stop()
    assert code == 0, server.output()
    assert left == [], f"processes left running: {left}"
    assert "Server stopped." in server.output()


def test_all_interfaces_without_a_key_warn_and_mistakes_are_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert serve.main(["--ckpt_path", "missing.ckpt", "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("WARNING: --host 0.0.0.0 without --api_key")
    assert err[1].startswith("ERROR: --ckpt_path=missing.ckpt: file not found") and len(err) == 2
    assert serve.main(["--ckpt_path", "best", "--host", "0.0.0.0", "--api_key", "k"]) == 1
    assert capsys.readouterr().err.startswith("ERROR: --ckpt_path=best: no best checkpoint under logs")
    assert serve.main(["--ckpt_path", "x.ckpt", "--host", "192.168.1.1"]) == 1
    assert "--host=192.168.1.1: give 127.0.0.1" in capsys.readouterr().err


def train_table(folder: Path) -> Path:
    """A table classifier (three features x1..x3, classes a, b, c) trained in `folder` (the working directory)."""
    config, table = str(ROOT / "configs" / "custom_csv.yaml"), write_table(folder / "table.csv")
    run(["fit", "--config", config, f"--data.path={table}", "--trainer.max_epochs=2", *QUIET])
    return next(folder.glob("logs/custom_csv/version_0/checkpoints/best.ckpt"))


def train_regressor(folder: Path) -> Path:
    """A regressor of y = 50 + 20 x1 - 10 x2 (conftest.write_numbers) trained in `folder` (the working directory)."""
    config, table = str(ROOT / "configs" / "regression_csv.yaml"), write_numbers(folder / "numbers.csv")
    run(["fit", "--config", config, f"--data.path={table}", "--data.label_column=y", "--trainer.max_epochs=3",
         "--model.lr=0.01", *QUIET])  # fmt: skip
    return next(folder.glob("logs/regression_csv/version_0/checkpoints/best.ckpt"))


{% if cookiecutter.text == "yes" -%}
def train_text(folder: Path) -> tuple[Path, Path]:
    """A text classifier on a tiny BERT, trained in `folder` (the working directory): (checkpoint, model folder)."""
    from textdata import write_texts, write_tiny_bert

    bert = write_tiny_bert(folder / "tiny-bert")
    config, data = str(ROOT / "configs" / "text_lora.yaml"), write_texts(folder / "texts.csv", 40)
    run(["fit", "--config", config, f"--model.model_name_or_path={bert}", f"--data.path={data}",
         "--data.max_length=16", "--trainer.max_epochs=1", *QUIET])  # fmt: skip
    return next(folder.glob("logs/*/version_0/checkpoints/best.ckpt")), bert


{% endif -%}
def test_a_table_model_reads_named_features_and_answers_as_predict(tmp_path, monkeypatch):
    """The table classifier's side of the contract, in this process: the request model of the
    HTTP process, then a worker's batch through the model."""
    monkeypatch.chdir(tmp_path)
    best = train_table(tmp_path)
    args = serve.parse(["--ckpt_path", str(best), "--max_batch_size", "4"])
    api = serve.build_api(args)
    monkeypatch.setattr(serve, "SERVED", api)
    rows = [{"x1": 0.1, "x2": -0.2, "x3": 1.0}, {"x1": 2, "x2": -2, "x3": 1}, {"x3": 0.9, "x2": -1.1, "x1": 1.0}]
    inputs = [serve.ClassifyRequest(features=row)._input for row in rows]
    for given, words in [
        ({"x1": 1, "x2": 2}, "missing ['x3']"),
        ({"x1": 1, "x2": 2, "x3": 3, "x4": 4}, "unknown ['x4']"),
        ({"x1": 1, "x2": "two", "x3": 3}, "features.x2: 'two' is not a finite number"),
        ({"x1": 1, "x2": True, "x3": 3}, "features.x2: True is not a finite number"),
        ({"x1": 1, "x2": float("nan"), "x3": 3}, "features.x2: nan is not a finite number"),
    ]:
        with pytest.raises(ValidationError, match=words.replace("[", r"\[").replace("]", r"\]")):
            serve.ClassifyRequest(features=given)
    api.setup("cpu")
    answers = [api.encode_response(p) for p in api.unbatch(api.predict(api.batch(inputs)))]
    model = load_model(Classifier, best)
    with torch.no_grad():
        expected = model(torch.tensor([[r[c] for c in ("x1", "x2", "x3")] for r in rows])).softmax(-1)
    assert [a["class"] for a in answers] == [model.hparams.class_names[k] for k in expected.argmax(-1).tolist()]
    for answer, p in zip(answers, expected):
        assert list(answer["probabilities"].values()) == pytest.approx(p.tolist(), abs=1e-5)


def test_a_regressor_answers_predicts_value_in_the_target_units(tmp_path, monkeypatch):
    """`{"features": ...}` -> `{"value": v}`: the number `predict` writes for the same row, in a batch or alone."""
    monkeypatch.chdir(tmp_path)
    best = train_regressor(tmp_path)
    rows = [{"x1": 1.0, "x2": 0.0, "x3": 0.0}, {"x1": 0.0, "x2": 1.0, "x3": 0.5}, {"x3": 2, "x2": -1.5, "x1": -0.25}]
    (tmp_path / "new.csv").write_text("x1,x2,x3\n" + "".join(f"{r['x1']},{r['x2']},{r['x3']}\n" for r in rows))
    config = str(ROOT / "configs" / "regression_csv.yaml")
    run(["predict", "--config", config, "--data.path=numbers.csv", "--data.label_column=y", "--ckpt_path", str(best),
         "--data.predict_file=new.csv", "--predictions.output=out.csv", *QUIET])  # fmt: skip
    with open(tmp_path / "out.csv", newline="") as f:
        predicted = [float(row["predicted"]) for row in csv.DictReader(f)]
    assert predicted[0] - predicted[1] == pytest.approx(30, abs=12)  # in the target's units: 20 x1 - 10 x2

    for batch in (4, 1):
        api = serve.build_api(serve.parse(["--ckpt_path", str(best), "--max_batch_size", str(batch)]))
        assert isinstance(api, serve.RegressorAPI) and "-> a value" in api.describe()
        monkeypatch.setattr(serve, "SERVED", api)
        inputs = [serve.ClassifyRequest(features=row).prepared() for row in rows]
        api.setup("cpu")
        if batch == 1:  # LitServe calls neither batch nor unbatch
            answers = [api.encode_response(api.predict(x)) for x in inputs]
        else:
            answers = [api.encode_response(v) for v in api.unbatch(api.predict(api.batch(inputs)))]
        assert [set(a) for a in answers] == [{"value"}] * 3
        assert [a["value"] for a in answers] == pytest.approx(predicted, rel=1e-5)
    with pytest.raises(ValidationError, match=r"missing \['x3'\]"):
        serve.ClassifyRequest(features={"x1": 1, "x2": 2})
    with pytest.raises(ValidationError, match="send the field 'features'"):
        serve.ClassifyRequest(text="twelve")


def test_a_checkpoint_of_an_unknown_model_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "lightning.LightningModule"}}, path)
    assert serve.main(["--ckpt_path", str(path)]) == 1
    known = ", ".join(serve.KINDS)
    assert capsys.readouterr().err.strip() == (
        f"ERROR: --ckpt_path={path}: lightning.LightningModule cannot be served; serve knows {known}"
    )


def test_images_are_read_as_training_reads_them():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert np.array_equal(serve.read_image(png(grey), (1, 8, 8))[0], grey)
    as_rgb = np.dstack([grey] * 3)  # a grey picture stored as RGB: the same pixels
    assert np.array_equal(serve.read_image(png(as_rgb), (1, 8, 8))[0], grey)
    rgb = serve.read_image("data:image/png;base64," + png(grey), (3, 8, 8))  # grey for a colour model: 3 copies
    assert rgb.shape == (3, 8, 8) and all(np.array_equal(c, grey) for c in rgb)
    jpeg = io.BytesIO()
    Image.fromarray(grey).save(jpeg, format="JPEG", quality=95)
    decoded = serve.read_image(base64.b64encode(jpeg.getvalue()).decode(), (1, 8, 8))
    assert np.abs(decoded[0].astype(int) - grey).max() < 16  # JPEG is lossy, but it is read


{% if cookiecutter.text == "yes" -%}
def test_a_text_regressor_answers_its_value_as_predict(tmp_path, monkeypatch):
    """A TextRegressor answers `{"value": v}`: predict_step's value for the text alone, in the target's units."""
    pytest.importorskip("transformers", reason="the text extra is not installed: pip install -e '.[text]'")
    from textdata import write_scores, write_tiny_bert

    monkeypatch.chdir(tmp_path)
    bert, data = write_tiny_bert(tmp_path / "tiny-bert"), write_scores(tmp_path / "scores.csv", 40)
    args = ["--config", str(ROOT / "configs" / "text_regression.yaml"), f"--data.path={data}",
            f"--model.model_name_or_path={bert}", "--data.max_length=16"]  # fmt: skip
    bodies = [{"text": text} for text in ("good", "the food was so very lovely", "awful day " * 20)]
    run(["fit", *args, "--trainer.max_epochs=1", *QUIET])
    best = next(tmp_path.glob("logs/*/version_0/checkpoints/best.ckpt"))
    api = serve.build_api(serve.parse(["--ckpt_path", str(best), "--max_batch_size", "4"]))
    assert isinstance(api, serve.TextRegressorAPI) and "-> a value" in api.describe()
    monkeypatch.setattr(serve, "SERVED", api)
    inputs = [serve.ClassifyRequest(**body).prepared() for body in bodies]
    api.setup("cpu")
    answers = [api.encode_response(v) for v in api.unbatch(api.predict(api.batch(inputs)))]
    for answer, x in zip(answers, inputs):
        with torch.no_grad():
            alone = api.model.predict_step((api.batch([x]),), 0)  # one request alone, as `predict` computes it
        assert set(answer) == {"value"} and answer["value"] == pytest.approx(float(alone[0]), abs=1e-4)


{% endif -%}
{% if cookiecutter.text == "yes" -%}
def test_a_text_model_tokenises_as_training_and_answers_as_predict(tmp_path, monkeypatch):
    """The text classifier's side, in this process: its tokenizer in the HTTP process, texts of
    different lengths in one batch, the same probabilities as the model on each text alone."""
    pytest.importorskip("transformers", reason="the text extra is not installed: pip install -e '.[text]'")
    from {{ cookiecutter.package_name }}.data.text import TextDataModule
    from {{ cookiecutter.package_name }}.models.text import TextClassifier

    monkeypatch.chdir(tmp_path)
    best, bert = train_text(tmp_path)
    api = serve.build_api(serve.parse(["--ckpt_path", str(best), "--max_batch_size", "4"]))
    assert isinstance(api, serve.TextClassifierAPI)
    monkeypatch.setattr(serve, "SERVED", api)
    texts = ["good", "the film was so very lovely and the food was fine", "awful day " * 20]  # the last is cut
    inputs = [serve.ClassifyRequest(text=text)._input for text in texts]
    for given, words in [({"text": " "}, "text: empty"), ({"image": "iVBOR"}, "send the field 'text'")]:
        with pytest.raises(ValidationError, match=words):
            serve.ClassifyRequest(**given)
    api.setup("cpu")
    answers = [api.encode_response(p) for p in api.unbatch(api.predict(api.batch(inputs)))]
    model = load_model(TextClassifier, best)
    data = TextDataModule(tokenizer=str(bert), max_length=16)
    for answer, x in zip(answers, data.encode(texts)):
        alone, _ = data.on_after_batch_transfer((x[None], None), 0)  # cut as `predict` cuts it
        with torch.no_grad():
            p = model.predict_step((alone,), 0)[0]
        assert answer["class"] == model.hparams.class_names[int(p.argmax())]
        assert list(answer["probabilities"].values()) == pytest.approx(p.tolist(), abs=1e-5)


{% endif -%}
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["table"{% if cookiecutter.text == "yes" %}, "text"{% endif %}])
def test_table_and_text_models_are_served_over_http(tmp_path, monkeypatch, kind):
    """A real server for each of the other two classifier kinds: concurrent answers equal the worker's
    code run in this process, one request at a time; a bad request gets its 422; SIGTERM ends it."""
    monkeypatch.chdir(tmp_path)
    if kind == "table":
        best = train_table(tmp_path)
        bodies = [{"features": {"x1": k / 10, "x2": -k / 7, "x3": 1.0}} for k in range(24)]
        bad, words = {"features": {"x1": 1.0, "x2": 2.0}}, "missing ['x3']"
{%- if cookiecutter.text == "yes" %}
    else:
        pytest.importorskip("transformers", reason="the text extra is not installed: pip install -e '.[text]'")
        best, _ = train_text(tmp_path)
        bodies = [{"text": " ".join(["good", "film", "bad", "day"][: 1 + k % 4] * (1 + k % 5))} for k in range(24)]
        bad, words = {"text": ""}, "text: empty"
{%- endif %}
    api = serve.build_api(serve.parse(["--ckpt_path", str(best), "--max_batch_size", "1"]))
    monkeypatch.setattr(serve, "SERVED", api)
    api.setup("cpu")
    expected = [api.encode_response(api.predict(serve.ClassifyRequest(**body)._input)) for body in bodies]
    server = Server(tmp_path, "--ckpt_path", str(best), "--max_batch_size", "8").start()
    try:
        answers = post_all(server, bodies, workers=12)
        assert [a.status_code for a in answers] == [200] * len(bodies)
        for answer, want in zip(answers, expected):
            got = answer.json()
            assert got["class"] == want["class"]
            assert list(got["probabilities"].values()) == pytest.approx(list(want["probabilities"].values()), abs=1e-5)
        refused = httpx.post(f"{server.url}/predict", json=bad, timeout=60)
        assert refused.status_code == 422 and words in refused.json()["detail"]
        assert server.stop() == (0, [])
    finally:
        server.kill()
