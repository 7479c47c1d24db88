"""Downloads from a mirror: a real HTTP server on 127.0.0.1 serves synthetic files; nothing else is contacted."""

import gzip
import hashlib
import socket
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import synthetic_digits, write_dataset

from {{ cookiecutter.package_name }}.data.download import main as download_main
from {{ cookiecutter.package_name }}.data.mnist import DATASETS, FILES, MNISTDataModule
from {{ cookiecutter.package_name }}.errors import UserError

N_TRAIN, N_TEST = 200, 50


@pytest.fixture(autouse=True)
def local_only(monkeypatch):
    """Fail any test that tries to open a connection anywhere but 127.0.0.1."""
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        assert address[0] == "127.0.0.1", f"a test tried to reach {address}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    for info in DATASETS.values():
        monkeypatch.setitem(info, "mirrors", [])


class Handler(SimpleHTTPRequestHandler):
    """Serves the folder; records each request; with `server.cut`, sends half of each file and hangs up."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        if not self.server.cut:
            return super().do_GET()
        body = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """An HTTP mirror of a synthetic MNIST, with DATASETS' MD5 sums set to its files'."""
    folder = write_dataset(tmp_path / "served", train=N_TRAIN, test=N_TEST)
    md5 = [hashlib.md5((folder / f"{stem}.gz").read_bytes()).hexdigest() for stem in FILES]
    monkeypatch.setitem(DATASETS["mnist"], "md5", md5)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
    server.requests, server.cut = [], False
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}/", folder=folder, md5=md5, server=server)
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def names(folder: Path) -> list[str]:
    """Every file under `folder` (hidden ones too), or [] when it does not exist."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def module(tmp_path, url, **kwargs) -> MNISTDataModule:
    return MNISTDataModule(data_dir=str(tmp_path / "data"), mirror=url, val_size=20, **kwargs)


def test_downloads_verifies_and_reads(tmp_path, mirror):
    dm = module(tmp_path, mirror.url)
    dm.prepare_data()
    target = tmp_path / "data" / "mnist"
    assert names(target) == sorted(f"{stem}.gz" for stem in FILES)
    for stem in FILES:
        assert (target / f"{stem}.gz").read_bytes() == (mirror.folder / f"{stem}.gz").read_bytes()
    assert sorted(mirror.server.requests) == sorted(f"/{stem}.gz" for stem in FILES)
    dm.setup("fit")
    assert {s: len(y) for s, (_, y) in dm.splits.items()} == {"train": N_TRAIN - 20, "val": 20, "test": N_TEST}
    x_test, y_test = synthetic_digits(N_TEST, 1)
    assert torch.equal(dm.splits["test"][0][:, 0], x_test)
    assert torch.equal(dm.splits["test"][1], y_test.long())
    # A second run finds the files and downloads nothing.
    module(tmp_path, mirror.url).prepare_data()
    assert len(mirror.server.requests) == len(FILES)


def test_mirror_without_trailing_slash(tmp_path, mirror):
    module(tmp_path, mirror.url.rstrip("/")).prepare_data()
    assert len(names(tmp_path / "data" / "mnist")) == len(FILES)


def test_downloads_only_missing_files(tmp_path, mirror):
    torchvision = tmp_path / "data" / "MNIST" / "raw"
    torchvision.mkdir(parents=True)
    for stem in FILES[:2]:  # the training files, uncompressed where torchvision keeps them
        (torchvision / stem).write_bytes(gzip.decompress((mirror.folder / f"{stem}.gz").read_bytes()))
    dm = module(tmp_path, mirror.url)
    dm.prepare_data()
    assert sorted(mirror.server.requests) == sorted(f"/{stem}.gz" for stem in FILES[2:])
    assert names(tmp_path / "data" / "mnist") == sorted(f"{stem}.gz" for stem in FILES[2:])
    dm.setup("fit")
    assert len(dm.splits["train"][1]) + len(dm.splits["val"][1]) == N_TRAIN


def test_no_download_when_disabled(tmp_path, mirror):
    with pytest.raises(UserError, match="missing"):
        module(tmp_path, mirror.url, download=False).prepare_data()
    assert mirror.server.requests == []
    assert names(tmp_path / "data") == []


def test_falls_back_to_the_next_public_mirror(tmp_path, mirror, monkeypatch):
    monkeypatch.setitem(DATASETS["mnist"], "mirrors", [f"http://127.0.0.1:{closed_port()}/", mirror.url])
    module(tmp_path, None).prepare_data()
    assert len(names(tmp_path / "data" / "mnist")) == len(FILES)


def test_checksum_mismatch_saves_nothing(tmp_path, mirror, monkeypatch):
    monkeypatch.setitem(DATASETS["mnist"], "md5", ["0" * 32] * len(FILES))
    with pytest.raises(UserError) as err:
        module(tmp_path, mirror.url).prepare_data()
    message = str(err.value)
    assert "checksum" in message
    assert mirror.md5[0] in message  # the MD5 actually received
    assert len(mirror.server.requests) == len(FILES)
    assert names(tmp_path / "data") == []


def test_one_bad_checksum_keeps_the_good_files_only(tmp_path, mirror, monkeypatch):
    monkeypatch.setitem(DATASETS["mnist"], "md5", [*mirror.md5[:3], "0" * 32])
    with pytest.raises(UserError) as err:
        module(tmp_path, mirror.url).prepare_data()
    assert "checksum" in str(err.value)
    assert f"missing {FILES[3]}" in str(err.value)
    assert names(tmp_path / "data" / "mnist") == sorted(f"{stem}.gz" for stem in FILES[:3])


def test_unreachable_mirror(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/"
    with pytest.raises(UserError) as err:
        module(tmp_path, url).prepare_data()
    message = str(err.value)
    assert "Download failed" in message
    assert url in message
    assert "refused" in message.lower()
    assert f"copy the files into {tmp_path / 'data' / 'mnist'}" in message
    for stem in FILES:
        assert stem in message
    assert names(tmp_path / "data") == []
    assert message.count(url) == 1  # one mirror, named once, not once per file


def test_each_failed_mirror_is_named_once(tmp_path, monkeypatch):
    dead = [f"http://127.0.0.1:{closed_port()}/a/", f"http://127.0.0.1:{closed_port()}/b/"]
    monkeypatch.setitem(DATASETS["mnist"], "mirrors", dead)
    with pytest.raises(UserError) as err:
        module(tmp_path, None).prepare_data()
    message = str(err.value)
    assert [message.count(url) for url in dead] == [1, 1]
    assert message.count("refused") == 2


def test_download_command_fetches_into_the_configs_folder(tmp_path, mirror, capsys):
    """`python -m <package>.data.download mnist` on a login node; then `fit` needs no network."""
    data = tmp_path / "data"
    assert download_main(["mnist", "--data_dir", str(data), "--mirror", mirror.url]) == 0
    assert names(data / "mnist") == sorted(f"{stem}.gz" for stem in FILES)
    assert capsys.readouterr().out.strip() == f"mnist: ready in {data / 'mnist'}"
    dm = MNISTDataModule(data_dir=str(data), download=False, val_size=20)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.splits["test"][1]) == N_TEST
    assert download_main(["mnist", "--data_dir", str(data), "--mirror", mirror.url]) == 0
    assert len(mirror.server.requests) == len(FILES)  # already there: nothing fetched again


def test_download_command_reports_one_error_line(tmp_path, capsys):
    url = f"http://127.0.0.1:{closed_port()}/"
    assert download_main(["kmnist", "--data_dir", str(tmp_path), "--mirror", url]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR: kmnist: missing") and url in err[0]
    assert names(tmp_path) == []


def test_download_command_refuses_the_shipped_digits(capsys):
    with pytest.raises(SystemExit) as exit_:
        download_main(["digits"])
    assert exit_.value.code == 2
    assert "invalid choice: 'digits'" in capsys.readouterr().err


def test_file_missing_on_mirror(tmp_path, mirror):
    (mirror.folder / f"{FILES[1]}.gz").unlink()
    with pytest.raises(UserError) as err:
        module(tmp_path, mirror.url).prepare_data()
    message = str(err.value)
    assert "Download failed" in message and "not found" in message.lower()
    assert f"missing {FILES[1]}" in message
    assert names(tmp_path / "data" / "mnist") == sorted(f"{stem}.gz" for stem in FILES if stem != FILES[1])


def test_connection_dropped_mid_file(tmp_path, mirror):
    mirror.server.cut = True
    with pytest.raises(UserError) as err:
        module(tmp_path, mirror.url).prepare_data()
    assert "Download failed" in str(err.value)
    assert names(tmp_path / "data") == []


def test_mirror_that_is_not_a_url(tmp_path):
    with pytest.raises(UserError) as err:
        module(tmp_path, "127.0.0.1/mnist").prepare_data()  # no http://
    assert "Download failed" in str(err.value)
    assert "unknown url type" in str(err.value)
