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

RUN = Path("logs") / "digits_mlp" / "version_0"
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


# Independent readings of the drawn images: from their pixels alone, not with the drawing code.


def matrix_cells(image: np.ndarray, n: int) -> list[list[tuple[int, int, int, int]]]:
    """(top, left, bottom, right) of each cell of an n x n matrix drawn with grey (200, 200, 200)
    cell borders: the grid's outer bounds are the rows and columns that many grey pixels cross."""
    grey = np.all(image == 200, axis=2)
    rows, cols = np.nonzero(grey.sum(axis=1) >= 10 * n)[0], np.nonzero(grey.sum(axis=0) >= 10 * n)[0]
    top, left, height, width = rows.min(), cols.min(), rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert height % n == 0 and width % n == 0, (height, width)
    h, w = height // n, width // n
    return [[(top + i * h, left + j * w, top + (i + 1) * h, left + (j + 1) * w) for j in range(n)] for i in range(n)]


def read_matrix(image: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cell: its shade (0 white .. 210 darkest), whether it is blue (else red or white), and
    whether anything (a count) is written on it, read from a fill pixel near its corner."""
    shade, blue, written = np.zeros((n, n)), np.zeros((n, n), bool), np.zeros((n, n), bool)
    for i, row in enumerate(matrix_cells(image, n)):
        for j, (top, left, bottom, right) in enumerate(row):
            fill = image[top + 3, left + 3].astype(int)
            shade[i, j] = 255 - fill.min()
            blue[i, j] = fill[2] == 255 and fill[0] < 255
            inside = image[top + 2 : bottom - 2, left + 2 : right - 2].astype(int)
            written[i, j] = bool(np.any(np.abs(inside - fill).sum(axis=2) > 0))
    return shade, blue, written


def assert_matrix_shows(image: np.ndarray, counts: torch.Tensor) -> None:
    """Rows are the true classes, columns the predicted ones: each cell's shade is its share of its
    row, blue on the diagonal and red elsewhere, and exactly the non-zero cells carry a count."""
    n = len(counts)
    shade, blue, written = read_matrix(image, n)
    share = (counts.double() / counts.sum(dim=1, keepdim=True).clamp_min(1)).numpy()
    assert np.abs(shade / 210 - share).max() <= 1.5 / 210, (shade, share)
    assert np.array_equal(blue, np.eye(n, dtype=bool) & (share > 0.005)), blue
    assert np.array_equal(written, counts.numpy() > 0), written


def tiles(grid: np.ndarray, images: list[np.ndarray], scale: int) -> list[int]:
    """Which of the grey `images` (H x W uint8) each tile of `grid` shows, scaled up `scale` times
    (each pixel a square), with the tiles read row by row: found by searching the grid's pixels."""
    found = []
    grey = grid[:, :, 0].astype(int)
    assert np.array_equal(grid[:, :, 0], grid[:, :, 1]) and np.array_equal(grid[:, :, 0], grid[:, :, 2])
    for k, image in enumerate(images):
        big = np.kron(image.astype(int), np.ones((scale, scale), dtype=int))
        h, w = big.shape
        windows = np.lib.stride_tricks.sliding_window_view(grey, w, axis=1)  # every row segment of width w
        hits = [(r, c) for r, c in zip(*np.nonzero(np.all(windows == big[0], axis=2)))
                if r + h <= len(grey) and np.array_equal(grey[r : r + h, c : c + w], big)]  # fmt: skip
        assert len(hits) == 1, (k, hits)
        found.append((*hits[0], k))
    return [k for _, _, k in sorted(found)]


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
    assert not torch.equal(counts, counts.T)  # so that a transposed matrix would show
    matrix = decoded(found.Images("val/confusion_matrix")[-1])
    assert 300 <= matrix.shape[1] <= 1000 and 300 <= matrix.shape[0] <= 1000
    assert_matrix_shows(matrix, counts)

    # The first 8 mistakes, in validation order, as their raw pixels doubled to 56 x 56, row by row.
    wrong = (predicted != y).nonzero().flatten()[:8]
    grid = decoded(found.Images("val/misclassified")[-1])
    assert tiles(grid, [x[i, 0].numpy() for i in wrong], scale=2) == list(range(len(wrong)))

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
    # Not symmetric, not even in where the zeros are: a transposed drawing reads differently.
    counts = torch.tensor([[5, 3, 0], [0, 7, 0], [2, 0, 3]])
    assert_matrix_shows(np.asarray(confusion_image(counts, ["cat", "dog", "owl"])), counts)
    zeros = torch.zeros(3, 3, dtype=torch.long)
    assert_matrix_shows(np.asarray(confusion_image(zeros, ["cat", "dog", "owl"])), zeros)


def test_the_grid_shows_the_images_in_order():
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (1, 28, 28), generator=g, dtype=torch.uint8) for _ in range(11)]
    grid = np.asarray(sample_grid(images, [f"{k}->{k + 1}" for k in range(11)]))
    assert tiles(grid, [i[0].numpy() for i in images], scale=2) == list(range(11))


def test_the_grid_shows_whole_in_tensorboards_image_card():
    """TensorBoard fits an image into its card, about 375 x 215 pixels at the default card width
    (measured in a headless Chromium screenshot): eight Fashion-MNIST mistakes with their two-line
    captions fit without being shrunk, so the 12-pixel captions read as drawn."""
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    images = [torch.zeros(1, 28, 28, dtype=torch.uint8)] * 8
    grid = sample_grid(images, [f"{names[k]}\n-> {names[9 - k]}" for k in range(8)])
    assert grid.width <= 375 and grid.height <= 215, grid.size
    text = np.asarray(grid)[56 : grid.height // 2, :, 0] < 128  # the first row's captions, below its images
    rows = np.nonzero(text.any(axis=1))[0]
    assert rows.max() - rows.min() >= 20  # two lines of text, each about 12 pixels high


def test_every_n_epochs_and_tables(workdir):
    run(["fit", *SHORT, "--tensorboard.every_n_epochs=2"])
    found = events(workdir / RUN)
    assert [e.step for e in found.Images("val/confusion_matrix")] == [found.Scalars("val/acc")[-1].step]
    run(["fit", *SHORT, "--tensorboard.every_n_epochs=0"])
    assert events(workdir / "logs" / "digits_mlp" / "version_1").Tags()["images"] == []

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
    tested = run(["test", *SMALL, "--ckpt_path=best"]).trainer.callback_metrics  # added to the same run
    found = events(workdir / RUN)
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", "logs", "--host", "127.0.0.1"]
    server = subprocess.Popen(
        [*command, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    base, name = f"http://127.0.0.1:{port}/data/plugin", "digits_mlp/version_0"
    try:
        deadline, tags = time.monotonic() + 60, {}
        while name not in tags:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "tensorboard did not answer within 60 s"
            try:
                tags = http(f"{base}/scalars/tags")
            except OSError:
                time.sleep(0.3)
        assert set(tags) == {name}  # the test is no run of its own
        assert {"val/acc", "val/loss", "train/loss_epoch", "test/acc", "test/loss"} <= set(tags[name])

        served = http(f"{base}/scalars/scalars?run={name}&tag=val/acc")  # [[wall time, step, value], ...]
        logged = found.Scalars("val/acc")
        assert [(s, v) for _, s, v in served] == [(e.step, pytest.approx(e.value)) for e in logged]
        assert len(served) == 2

        # HPARAMS: one row, the training run, with each metric's final value: validation and test.
        statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
        metrics = ("val/acc", "val/loss", "test/acc", "test/loss")
        columns = [{"hparam": "lr"}, *({"metric": {"tag": t, "group": ""}} for t in metrics)]
        request = {"startIndex": 0, "sliceSize": 10, "allowedStatuses": statuses, "colParams": columns}
        (group,) = http(f"{base}/hparams/session_groups", request)["sessionGroups"]
        assert group["hparams"]["lr"] == pytest.approx(1e-5)
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert values["val/acc"] == pytest.approx(logged[-1].value)
        assert values["val/loss"] == pytest.approx(found.Scalars("val/loss")[-1].value)
        assert values["test/acc"] == pytest.approx(tested["test/acc"].item())
        assert values["test/loss"] == pytest.approx(tested["test/loss"].item())
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server.stderr.close()
