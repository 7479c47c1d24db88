"""A real server for the tests: `python -m {{ cookiecutter.package_name }}.serve ...` in a process group of its
own (so that every process it starts can be found), on a free loopback port, its output in a file."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_members(group: int) -> list[int]:
    """The live (not zombie) processes of process group `group`."""
    if not Path("/proc/self/stat").exists():  # not Linux: signal 0 tells whether any is left
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return []
        return [group]
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if fields[0] != "Z" and int(fields[2]) == group:
            found.append(int(stat.parent.name))
    return found


class Server:
    """Start with `start()`; `url`, `headers` (the API key) for requests; `stop()` sends SIGTERM."""

    def __init__(self, cwd: Path, *args: str, api_key: str | None = None, script: list[str] | None = None):
        self.cwd, self.args, self.api_key = cwd, list(args), api_key
        self.command = script or ["-m", "{{ cookiecutter.package_name }}.serve"]
        self.process = None
        self.log = cwd / f"serve-{id(self)}.log"

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 240) -> "Server":
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        key = ["--api_key", self.api_key] if self.api_key else []
        pythonpath = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, *self.command, *self.args, "--port", str(self.port), *key],
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: every process it starts is in it
                env={**os.environ, "PYTHONPATH": pythonpath},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.kill()
        raise AssertionError(f"the server did not answer /health within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self, timeout: float = 60) -> tuple[int, list[int]]:
        """SIGTERM to the server's process (as a process manager sends it); its exit code and the
        processes of its group still running a few seconds later."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        deadline = time.monotonic() + 10
        while group_members(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        return code, group_members(self.process.pid)

    def kill(self) -> None:
        """Whatever is left of it, at the end of the tests."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
