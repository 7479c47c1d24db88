"""Hostile inputs, one table: every case ends with one clear message (what, where, how to fix),
a non-zero exit, no traceback and nothing half-written.

Exit code 2: jsonargparse rejected the options or a config file (one `error:` line, then details).
Exit code 1: the CLI's own checks (exactly one `ERROR:` line). A traceback appears only with the
debug switch (<PACKAGE>_DEBUG=1). The table runs in this process (fast); `-m slow` runs one case
of each kind again as `python train.py` in a fresh process. Bad template answers (slug, path traversal, keyword or
shadowing package name, email) are the template's own table: tests/test_hooks.py of the template.
"""

import gzip
import hashlib
from pathlib import Path

import lightning
import pytest
import torch
from conftest import ROOT, SMALL, Payload, run_train_py, write_dataset, write_images
from PIL import Image

from {{ cookiecutter.package_name }}.cli import DEBUG, main
from {{ cookiecutter.package_name }}.data.idx import download, write_idx
from {{ cookiecutter.package_name }}.data.mnist import DATASETS, FILES
from {{ cookiecutter.package_name }}.errors import UserError
from {{ cookiecutter.package_name }}.models import Classifier

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

CSV = f"--config={ROOT / 'configs' / 'custom_csv.yaml'}"
IMAGES = f"--config={ROOT / 'configs' / 'custom_images.yaml'}"
MARKER = "UNPICKLED"  # appears only if a checkpoint's pickled payload ever runs


# --- set-ups: each writes one bad input into the working folder ---------------------------------


def yaml_syntax(w: Path) -> None:
    (w / "broken.yaml").write_text("model:\n  init_args:\n    width: [64, 128\n")


def bad_data(change):
    """A copy of the synthetic dataset in bad/mnist/, with `change(folder)` applied."""

    def setup(w: Path) -> None:
        change(write_dataset(w / "bad" / "mnist"))

    return setup


def raw(folder: Path, stem: str) -> bytes:
    return gzip.decompress((folder / f"{stem}.gz").read_bytes())


def put(folder: Path, stem: str, data: bytes) -> None:
    (folder / f"{stem}.gz").write_bytes(gzip.compress(data))


def wrong_magic(f: Path) -> None:
    put(f, FILES[0], b"\x08\x03\x00\x00" + raw(f, FILES[0])[4:])


def truncated_idx(f: Path) -> None:
    put(f, FILES[0], raw(f, FILES[0])[:-100])


def label_out_of_range(f: Path) -> None:
    write_idx(f / f"{FILES[1]}.gz", torch.full((600,), 12, dtype=torch.uint8))


def count_mismatch(f: Path) -> None:
    write_idx(f / f"{FILES[1]}.gz", torch.zeros(599, dtype=torch.uint8))


def not_gzip(f: Path) -> None:
    (f / f"{FILES[3]}.gz").write_bytes(b"this is not gzip data")


def bad_mirror(w: Path) -> None:
    """A 'mirror' (a local folder, file:// URL) serving files whose MD5 is not the expected one."""
    write_dataset(w / "mirror")


def csv_with(text: str):
    def setup(w: Path) -> None:
        (w / "table.csv").write_text(text)

    return setup


def latin1_csv(w: Path) -> None:
    (w / "latin.csv").write_bytes("x1,label\n1,café\n2,thé\n".encode("latin-1"))


def mixed_images(w: Path) -> None:
    write_images(w / "images", size=12)
    Image.new("L", (16, 10), 128).save(w / "images" / "red" / "grey-and-bigger.png")


def empty_class_folder(w: Path) -> None:
    write_images(w / "images")
    (w / "images" / "green").mkdir()


def broken_image(w: Path) -> None:
    write_images(w / "images")
    (w / "images" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def one_class(w: Path) -> None:
    write_images(w / "images")
    for p in (w / "images" / "blue").iterdir():
        p.unlink()
    (w / "images" / "blue").rmdir()


def checkpoint_of(model: Classifier) -> dict:
    return {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": lightning.__version__, "epoch": 0, "global_step": 0}  # fmt: skip


def cnn_checkpoint(w: Path) -> None:
    """CNN weights without the hyperparameters that describe them (which the CLI would follow):
    the model is then the config's MLP."""
    state = checkpoint_of(Classifier(backbone="cnn", width=8, depth=1))
    del state["hyper_parameters"]
    torch.save(state, w / "cnn.ckpt")


def truncated_checkpoint(w: Path) -> None:
    torch.save(checkpoint_of(Classifier(width=16)), w / "whole.ckpt")
    (w / "truncated.ckpt").write_bytes((w / "whole.ckpt").read_bytes()[:1000])


def text_checkpoint(w: Path) -> None:
    (w / "notes.ckpt").write_text("not a checkpoint\n")


def pickled_checkpoint(w: Path) -> None:
    torch.save({"state_dict": {"weight": Payload(str(w / MARKER))}, "hyper_parameters": {}}, w / "payload.ckpt")


BAD = ["--data.data_dir=bad", "--data.download=false"]
# fmt: off
# id, set-up, arguments, exit code, words the message must contain
CASES = [
    # The command line and config files.
    ("unknown-flag", None, ["fit", "--model.nope=1"], 2, ["nope", "not accepted"]),
    ("unknown-top-level-flag", None, ["fit", "--nope=1"], 2, ["unrecognized arguments", "--nope"]),
    ("unknown-subcommand", None, ["train"], 2, ["invalid choice", "'train'", "'fit'"]),
    ("wrong-type-int", None, ["fit", "--trainer.max_epochs=abc"], 2, ["trainer.max_epochs", "abc", "int"]),
    ("wrong-type-float", None, ["fit", "--model.init_args.lr=fast"], 2, ["lr", "fast", "float"]),
    ("unknown-backbone", None, ["fit", "--model.backbone=resnet"], 2, ["backbone", "resnet", "'mlp', 'cnn'"]),
    ("unknown-dataset", None, ["fit", "--data.name=cifar"], 2, ["name", "cifar", "'mnist'"]),
    ("missing-config", None, ["fit", "--config=nosuch.yaml"], 2, ["nosuch.yaml", "does not exist"]),
    ("yaml-syntax", yaml_syntax, ["fit", "--config=broken.yaml"], 2, ["parsing config", "flow sequence", "line 3"]),
    ("gpu-without-gpu", None, ["fit", "--trainer.accelerator=gpu"], 1, ["no GPU", "configs/trainer/cpu.yaml"]),
    ("fsdp-on-cpu", None, ["fit", "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=fsdp"], 1,
     ["FSDP", "NVIDIA GPUs", "configs/trainer/ddp.yaml"]),
    ("two-devices-one-device-strategy", None,
     ["fit", "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=single_device"], 1,
     ["devices=2", "single_device", "configs/trainer/ddp.yaml"]),
    ("sync-batchnorm-on-cpu", None, ["fit", "--trainer.accelerator=cpu", "--trainer.sync_batchnorm=true"], 1,
     ["sync_batchnorm", "NVIDIA GPUs"]),
    ("val-size-too-big", None, ["fit", "--data.val_size=600"], 1, ["val_size=600", "between 1 and 599"]),
    # MNIST-style IDX files.
    ("data-missing-offline", None, ["fit", "--data.data_dir=empty", "--data.download=false"], 1,
     ["missing", "train-images-idx3-ubyte", "empty/mnist", "download=true"]),
    ("idx-wrong-magic", bad_data(wrong_magic), ["fit", *BAD], 1, ["train-images", "not an IDX file", "delete it"]),
    ("idx-truncated", bad_data(truncated_idx), ["fit", *BAD], 1, ["train-images", "truncated", "delete it"]),
    ("idx-not-gzip", bad_data(not_gzip), ["fit", *BAD], 1, ["t10k-labels", "cannot be read", "delete it"]),
    ("labels-out-of-range", bad_data(label_out_of_range), ["fit", *BAD], 1, ["label 12 is out of range", "0..9"]),
    ("image-label-count-differ", bad_data(count_mismatch), ["fit", *BAD], 1,
     ["600 images", "599 labels", "matching pair"]),
    ("download-checksum-mismatch", bad_mirror, ["fit", "--data.data_dir=fresh", "--data.mirror=file://{w}/mirror"], 1,
     ["checksum mismatch", "file not saved", "download=true"]),
    # CSV tables.
    ("csv-nan", csv_with("x1,x2,label\n1,2,a\nnan,3,b\n"), ["fit", CSV, "--data.path=table.csv"], 1,
     ["table.csv:3", "'x1'", "'nan'", "not a finite number"]),
    ("csv-string-feature", csv_with("x1,x2,label\n1,2,a\n1,two,b\n"), ["fit", CSV, "--data.path=table.csv"], 1,
     ["table.csv:3", "'x2'", "'two'", "not a finite number"]),
    ("csv-missing-label-column", csv_with("x1,x2,class\n1,2,a\n"), ["fit", CSV, "--data.path=table.csv"], 1,
     ["table.csv", "no label column 'label'", "--data.label_column"]),
    ("csv-header-only", csv_with("x1,x2,label\n"), ["fit", CSV, "--data.path=table.csv"], 1, ["no rows"]),
    ("csv-missing-file", None, ["fit", CSV, "--data.path=nosuch.csv"], 1, ["nosuch.csv", "file not found"]),
    ("csv-not-utf8", latin1_csv, ["fit", CSV, "--data.path=latin.csv"], 1, ["latin.csv", "UTF-8"]),
    # Image folders.
    ("images-mixed-sizes-and-modes", mixed_images, ["fit", IMAGES, "--data.root=images", "--data.image_size=null"], 1,
     ["grey-and-bigger.png", "16x10", "12x12", "--data.image_size"]),
    ("images-empty-class-folder", empty_class_folder, ["fit", IMAGES, "--data.root=images"], 1,
     ["images/green", "no images", "remove the folder"]),
    ("images-broken-file", broken_image, ["fit", IMAGES, "--data.root=images"], 1,
     ["broken.png", "not a readable image"]),
    ("images-one-class", one_class, ["fit", IMAGES, "--data.root=images"], 1, ["1 class", "at least two"]),
    ("images-missing-root", None, ["fit", IMAGES, "--data.root=nowhere"], 1, ["nowhere", "folder not found"]),
    # Checkpoints.
    ("ckpt-missing", None, ["test", "--ckpt_path=nosuch.ckpt"], 1, ["nosuch.ckpt", "file not found"]),
    ("ckpt-truncated", truncated_checkpoint, ["test", "--ckpt_path=truncated.ckpt"], 1,
     ["truncated.ckpt", "not a readable checkpoint"]),
    ("ckpt-not-a-checkpoint", text_checkpoint, ["test", "--ckpt_path=notes.ckpt"], 1,
     ["notes.ckpt", "not a readable checkpoint"]),
    ("ckpt-other-architecture", cnn_checkpoint, ["test", "--ckpt_path=cnn.ckpt"], 1,
     ["does not fit this model", "same backbone"]),
    ("ckpt-pickled-payload", pickled_checkpoint, ["test", "--ckpt_path=payload.ckpt"], 1,
     ["payload.ckpt", "refused to load", "weights_only=True"]),
    ("ckpt-last-before-any-fit", None, ["test", "--ckpt_path=last"], 1, ["no last checkpoint", "train first"]),
    ("every-n-train-steps-zero", None,
     ["fit", "--trainer.callbacks=[{class_path: {{ cookiecutter.package_name }}.checkpointing.LastCheckpoint, "
      "init_args: {every_n_train_steps: 0}}]"], 1, ["every_n_train_steps=0", "at least 1"]),
]
# fmt: on


def files(where: Path) -> set[str]:
    return {str(p.relative_to(where)) for p in where.rglob("*") if p.is_file()}


def written(before: set[str], after: set[str]) -> set[str]:
    """New files that are more than a run's log header (config.yaml, events)."""
    logs = ("config.yaml", "hparams.yaml")
    return {f for f in after - before if not (f.endswith(logs) or ".tfevents." in f)}


def check(stderr: str, code: int, exit_code, words: list[str]) -> None:
    assert exit_code == code, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    if code == 1:
        # The CLI's own message: exactly one ERROR line, and it is the last line.
        assert [line for line in lines if line.startswith("ERROR:")] == lines[-1:], stderr
        message = lines[-1]
    else:  # jsonargparse: usage, one error line, then details
        errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
        assert len(errors) == 1, stderr
        message = "\n".join(lines[errors[0] :])
    for word in words:
        assert word in message, f"{word!r} not in:\n{message}"


def prepare(workdir: Path, setup) -> set[str]:
    (workdir / "empty").mkdir()
    if setup:
        setup(workdir)
    return files(workdir)


def in_(workdir: Path, args: list[str]) -> list[str]:
    """`args` with {w} replaced by the working folder, and options for a small, quiet run."""
    mnist = CSV not in args and IMAGES not in args
    small = [a for a in SMALL if mnist or not a.startswith("--data.")]
    return [args[0], *small, *(a.replace("{w}", str(workdir)) for a in args[1:])]


# The cases that need a machine without a GPU: on one with a GPU they would start real training.
HAS_GPU = torch.cuda.is_available() or torch.backends.mps.is_available()
NO_GPU_CASES = {"gpu-without-gpu"}


def param(case: tuple):
    skip = pytest.mark.skipif(case[0] in NO_GPU_CASES and HAS_GPU, reason="this machine has a GPU (or MPS)")
    return pytest.param(*case[1:], id=case[0], marks=skip)


@pytest.mark.parametrize(("setup", "args", "code", "words"), [param(c) for c in CASES])
def test_hostile_input_in_process(workdir, capsys, monkeypatch, setup, args, code, words):
    monkeypatch.delenv(DEBUG, raising=False)
    before = prepare(workdir, setup)
    with pytest.raises(SystemExit) as exit_:
        main(in_(workdir, args))
    check(capsys.readouterr().err, code, exit_.value.code, words)
    assert not written(before, files(workdir)), "half-written files"
    assert not (workdir / MARKER).exists(), "the checkpoint's pickled payload ran"


# One case of each kind again as `python train.py` (a fresh process costs seconds; all would take minutes).
AS_COMMANDS = ["unknown-flag", "yaml-syntax", "fsdp-on-cpu", "idx-truncated", "download-checksum-mismatch",
               "csv-nan", "images-empty-class-folder", "ckpt-pickled-payload"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("setup", "args", "code", "words"),
    [param(c) for c in CASES if c[0] in AS_COMMANDS],
)
def test_hostile_input_as_a_command(workdir, monkeypatch, setup, args, code, words):
    monkeypatch.delenv(DEBUG, raising=False)
    before = prepare(workdir, setup)
    result = run_train_py(*in_(workdir, args), cwd=workdir)
    check(result.stderr, code, result.returncode, words)
    assert "Traceback" not in result.stdout
    assert not written(before, files(workdir)), "half-written files"
    assert not (workdir / MARKER).exists(), "the checkpoint's pickled payload ran"


def test_the_debug_switch_shows_tracebacks(workdir, capsys, monkeypatch):
    # Each case's id names one parametrized test: a repeated id would hide a case behind another.
    assert len({c[0] for c in CASES}) == len(CASES)
    assert set(AS_COMMANDS) <= {c[0] for c in CASES}
    monkeypatch.setenv(DEBUG, "1")
    with pytest.raises(Exception, match="not found"):
        main(in_(workdir, ["fit", CSV, "--data.path=nosuch.csv"]))


def test_the_pickled_payload_is_live(tmp_path):
    """The refusal above means something: loading the file unsafely does run the payload."""
    pickled_checkpoint(tmp_path)
    torch.load(tmp_path / "payload.ckpt", weights_only=False)
    assert (tmp_path / MARKER).exists()


def test_the_mirror_case_is_a_checksum_mismatch_not_a_missing_file(tmp_path):
    """The download case reaches the MD5 check: the mirror serves the file, and `download` keeps
    it under its own MD5 and refuses it under MNIST's (the table's)."""
    bad_mirror(tmp_path)
    url = f"file://{tmp_path}/mirror/{FILES[0]}.gz"
    served = (tmp_path / "mirror" / f"{FILES[0]}.gz").read_bytes()
    download(url, tmp_path / "kept.gz", hashlib.md5(served).hexdigest())
    assert (tmp_path / "kept.gz").read_bytes() == served
    with pytest.raises(UserError, match=f"checksum mismatch .*expected {DATASETS['mnist']['md5'][0]}"):
        download(url, tmp_path / "refused.gz", DATASETS["mnist"]["md5"][0])
    assert not (tmp_path / "refused.gz").exists()
