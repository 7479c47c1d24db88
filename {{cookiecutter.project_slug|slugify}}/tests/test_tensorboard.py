"""What TensorBoard shows of a run (the TensorBoardViews callback): a confusion matrix and a grid
of misclassified images at each validation end, the hyperparameters with the final metrics in
the HPARAMS tab, and the same values through a real `tensorboard` server's HTTP API."""

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SMALL, write_table
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from {{ cookiecutter.package_name }}.callbacks import confusion_image, sample_grid
from {{ cookiecutter.package_name }}.cli import run

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

RUN = Path("logs") / "mnist_mlp" / "version_0"
# Two short epochs at a low learning rate: the model is still poor, so there are mistakes to show.
SHORT = [*SMALL, "--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--model.lr=1e-5"]


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def decoded(event) -> np.ndarray:
    with Image.open(io.BytesIO(event.encoded_image_string)) as image:
        assert (image.width, image.height) == (event.width, event.height)
        return np.asarray(image.convert("RGB"))


def hparams_record(found: EventAccumulator, tag: str):
    return plugin_data_pb2.HParamsPluginData.FromString(found.PluginTagToContent("hparams")[f"_hparams_/{tag}"])


def test_validation_images_and_hparams(workdir):
    cli = run(["fit", *SHORT])
    found = events(workdir / RUN)
    assert {"val/confusion_matrix", "val/misclassified"} <= set(found.Tags()["images"])
    # One of each per epoch, none for the sanity check before training, at the steps of the val scalars.
    steps = [e.step for e in found.Scalars("val/acc")]
    assert len(steps) == 2
    assert [e.step for e in found.Images("val/confusion_matrix")] == steps
    assert [e.step for e in found.Images("val/misclassified")] == steps

    # Recompute the last epoch's view independently: the final model on the validation split.
    model, data = cli.model.eval(), cli.datamodule
    x, y = data.splits["val"]
    with torch.no_grad():
        predicted = torch.cat([model(b.float() / 255) for b in x.split(64)]).argmax(dim=-1)
    counts = torch.zeros(10, 10, dtype=torch.long).index_put_((y, predicted), torch.tensor(1), accumulate=True)
    assert int(counts.sum()) == 100 and int(counts.trace()) < 100  # there are mistakes to show
    names = [str(k) for k in range(10)]
    matrix = decoded(found.Images("val/confusion_matrix")[-1])
    assert 300 <= matrix.shape[1] <= 1000 and 300 <= matrix.shape[0] <= 1000
    assert np.array_equal(matrix, np.asarray(confusion_image(counts, names)))

    wrong = (predicted != y).nonzero().flatten()[:24]  # the first mistakes, in validation order
    captions = [f"{names[t]}->{names[p]}" for t, p in zip(y[wrong].tolist(), predicted[wrong].tolist())]
    grid = decoded(found.Images("val/misclassified")[-1])
    assert np.array_equal(grid, np.asarray(sample_grid(list(x[wrong]), captions)))  # the raw pixels, captioned

    # HPARAMS: the run's settings (model and data) as numbers and text, and the metrics to show.
    metrics = [m.name.tag for m in hparams_record(found, "experiment").experiment.metric_infos]
    assert {"val/acc", "val/f1", "val/loss", "train/loss_epoch", "test/acc"} <= set(metrics)
    hparams = hparams_record(found, "session_start_info").session_start_info.hparams
    assert hparams["lr"].number_value == pytest.approx(1e-5)
    assert hparams["backbone"].string_value == "mlp"
    assert hparams["compile"].string_value == "False"
    assert hparams["input_shape"].string_value == "[1, 28, 28]"
    assert hparams["data/batch_size"].number_value == 64
    assert hparams["data/name"].string_value == "mnist"


def test_confusion_matrix_counts_are_drawn(workdir):
    counts = torch.tensor([[5, 0, 1], [0, 7, 0], [2, 0, 3]])
    image = np.asarray(confusion_image(counts, ["cat", "dog", "owl"])).astype(int)
    blank = np.asarray(confusion_image(torch.zeros(3, 3, dtype=torch.long), ["cat", "dog", "owl"])).astype(int)
    assert image.shape == blank.shape
    # Shading and counts make a difference exactly where counts are not zero: compare cell centres.
    changed = np.abs(image - blank).sum(axis=2) > 0
    ys, xs = np.nonzero(changed)
    assert len(ys) > 0
    cells = {(int(r), int(c)) for r, c in zip(ys, xs)}
    top, left = min(r for r, _ in cells), min(c for _, c in cells)
    cell = 28
    hit = {((r - top) // cell, (c - left) // cell) for r, c in cells}
    assert hit == {(i, j) for i in range(3) for j in range(3) if counts[i, j]}


def test_every_n_epochs_and_tables(workdir):
    run(["fit", *SHORT, "--tensorboard.every_n_epochs=2"])
    found = events(workdir / RUN)
    assert [e.step for e in found.Images("val/confusion_matrix")] == [found.Scalars("val/acc")[-1].step]
    run(["fit", *SHORT, "--tensorboard.every_n_epochs=0"])
    assert events(workdir / "logs" / "mnist_mlp" / "version_1").Tags()["images"] == []

    # A table is no image: a confusion matrix, no grid of samples.
    table = write_table(workdir / "table.csv")
    quiet = [a for a in SHORT if not a.startswith("--data.")]
    run(["fit", f"--config={ROOT / 'configs' / 'custom_csv.yaml'}", *quiet, f"--data.path={table}"])
    found = events(workdir / "logs" / "custom_csv" / "version_0")
    assert found.Tags()["images"] == ["val/confusion_matrix"]
    assert decoded(found.Images("val/confusion_matrix")[-1]).shape[2] == 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_a_tensorboard_server_serves_the_runs_scalars_and_hparams(workdir):
    run(["fit", *SHORT])
    found = events(workdir / RUN)
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", "logs", "--host", "127.0.0.1"]
    server = subprocess.Popen(
        [*command, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    base, name = f"http://127.0.0.1:{port}/data/plugin", "mnist_mlp/version_0"
    try:
        deadline, tags = time.monotonic() + 60, {}
        while name not in tags:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "tensorboard did not answer within 60 s"
            try:
                tags = http(f"{base}/scalars/tags")
            except OSError:
                time.sleep(0.3)
        assert {"val/acc", "val/loss", "train/loss_epoch"} <= set(tags[name])

        served = http(f"{base}/scalars/scalars?run={name}&tag=val/acc")  # [[wall time, step, value], ...]
        logged = found.Scalars("val/acc")
        assert [(s, v) for _, s, v in served] == [(e.step, pytest.approx(e.value)) for e in logged]
        assert len(served) == 2

        # HPARAMS: the hyperparameters with each metric's final value.
        statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
        columns = [{"hparam": "lr"}, *({"metric": {"tag": t, "group": ""}} for t in ("val/acc", "val/loss"))]
        request = {"startIndex": 0, "sliceSize": 10, "allowedStatuses": statuses, "colParams": columns}
        (group,) = http(f"{base}/hparams/session_groups", request)["sessionGroups"]
        assert group["hparams"]["lr"] == pytest.approx(1e-5)
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert values["val/acc"] == pytest.approx(logged[-1].value)
        assert values["val/loss"] == pytest.approx(found.Scalars("val/loss")[-1].value)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server.stderr.close()
