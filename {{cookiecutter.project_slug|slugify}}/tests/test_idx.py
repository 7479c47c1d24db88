"""IDX files: round trips, clear errors for damaged files, and writes that never leave half a file."""

import gzip
import os
import struct

import pytest
import torch

from {{ cookiecutter.package_name }}.data import idx
from {{ cookiecutter.package_name }}.data.idx import atomic_write, read_idx, write_idx
from {{ cookiecutter.package_name }}.errors import UserError


def sample_images(n: int = 5, rows: int = 4, cols: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, rows, cols), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_round_trip_images(tmp_path, name):
    x = sample_images()
    write_idx(tmp_path / name, x)
    back = read_idx(tmp_path / name)
    assert back.dtype == torch.uint8
    assert back.shape == (5, 4, 3)
    assert torch.equal(back, x)


@pytest.mark.parametrize("name", ["labels-idx1-ubyte", "labels-idx1-ubyte.gz"])
def test_round_trip_labels(tmp_path, name):
    y = torch.tensor([0, 9, 3, 255, 7], dtype=torch.uint8)
    write_idx(tmp_path / name, y)
    assert torch.equal(read_idx(tmp_path / name), y)


def test_file_layout_is_the_idx_format(tmp_path):
    """The raw bytes follow the published format, so other tools read our files too."""
    x = sample_images(2, 3, 4)
    write_idx(tmp_path / "raw", x)
    write_idx(tmp_path / "packed.gz", x)
    raw = (tmp_path / "raw").read_bytes()
    assert raw[:4] == bytes([0, 0, 0x08, 3])
    assert struct.unpack(">3I", raw[4:16]) == (2, 3, 4)
    assert raw[16:] == x.numpy().tobytes()
    assert gzip.decompress((tmp_path / "packed.gz").read_bytes()) == raw


def assert_fix_hint(message: str, path) -> None:
    assert str(path) in message
    assert "delete it and download it again" in message


def test_wrong_magic_number(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x1f\x8b\x08\x03" + bytes(20))  # e.g. a gzip file without the .gz suffix
    with pytest.raises(UserError) as err:
        read_idx(path)
    assert_fix_hint(str(err.value), path)
    assert "not an IDX file" in str(err.value)
    assert "1f8b0803" in str(err.value)


def test_wrong_value_type(tmp_path):
    path = tmp_path / "floats-idx1"
    path.write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + bytes(4))  # type 0x0D = float32
    with pytest.raises(UserError, match="not an IDX file of unsigned bytes"):
        read_idx(path)


@pytest.mark.parametrize("name", ["images", "images.gz"])
def test_truncated_file(tmp_path, name):
    path = tmp_path / name
    write_idx(path, sample_images())  # 16 header bytes + 60 values
    raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
    cut = raw[:-7]
    path.write_bytes(gzip.compress(cut) if name.endswith(".gz") else cut)
    with pytest.raises(UserError) as err:
        read_idx(path)
    assert_fix_hint(str(err.value), path)
    assert "truncated" in str(err.value)
    assert "76 bytes" in str(err.value) and "69" in str(err.value)


def test_padded_file(tmp_path):
    path = tmp_path / "labels"
    write_idx(path, torch.arange(4, dtype=torch.uint8))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(UserError, match="truncated or padded"):
        read_idx(path)


@pytest.mark.parametrize("content", [b"", b"\x00\x00\x08", b"\x00\x00\x08\x03\x00\x00\x00\x05"])
def test_header_cut_short(tmp_path, content):
    path = tmp_path / "short"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        read_idx(path)
    assert_fix_hint(str(err.value), path)


@pytest.mark.parametrize(
    "content",
    [
        b"this is not gzip at all",  # bad magic
        b"\x1f\x8b\x08\x00" + bytes(6) + b"garbage that does not inflate",  # bad deflate stream
        "gzip-cut",  # a valid stream, cut in the middle
    ],
)
def test_corrupt_gz(tmp_path, content):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    if content == "gzip-cut":
        write_idx(path, torch.arange(200, dtype=torch.uint8))
        content = path.read_bytes()[:-20]
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        read_idx(path)
    assert_fix_hint(str(err.value), path)
    assert "cannot be read" in str(err.value)


def test_missing_file_is_a_user_error(tmp_path):
    path = tmp_path / "absent.gz"
    with pytest.raises(UserError) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_atomic_write_creates_folders_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "file"
    atomic_write(path, b"first")
    atomic_write(path, b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["file"]


class FailingFile:
    """Stands in for the open temporary file: writes half the data, then the disk is full."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize("existing", [False, True])
def test_atomic_write_failure_leaves_no_temp_and_no_partial_target(tmp_path, monkeypatch, existing):
    path = tmp_path / "out" / "images.gz"
    if existing:
        atomic_write(path, b"old complete content")
    real_fdopen = os.fdopen
    monkeypatch.setattr(idx.os, "fdopen", lambda fd, mode: FailingFile(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space left"):
        write_idx(path, sample_images())
    monkeypatch.undo()
    if existing:
        assert os.listdir(path.parent) == ["images.gz"]
        assert path.read_bytes() == b"old complete content"
    else:
        assert os.listdir(path.parent) == []


def test_atomic_write_interrupted_rename_leaves_no_temp(tmp_path, monkeypatch):
    """Even a KeyboardInterrupt at the last step cleans up the temporary file."""
    path = tmp_path / "labels"

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(idx.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, b"data")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []
