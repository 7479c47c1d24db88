"""Load test of `python -m {{ cookiecutter.package_name }}.serve`: requests per second and latency percentiles
for 1, 8 and 64 concurrent clients against servers with --max_batch_size 1, 8 and 32, next to the
ceiling: the same model's `predict_step` in this process, in batches of the same size, on the
same images (already decoded: no HTTP, no PNG, no queue).

    python train.py fit                      # the default MLP on the shipped digits
    python benchmarks/serve.py --ckpt_path best
    python benchmarks/serve.py --ckpt_path best --seconds 10 --clients 1,8,64 --batch_sizes 1,8,32

The clients (asyncio, httpx) run in this process and send the digits' test images as PNG, each
client one request at a time, for `--seconds` per cell after a short warm-up. On a machine with
few cores they compete with the server for them: read the table as this machine's, not as the
server's alone. Needs the serve and dev extras (litserve, httpx).
"""

import argparse
import asyncio
import base64
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from {{ cookiecutter.package_name }}.cli import resolve_checkpoint  # noqa: E402
from {{ cookiecutter.package_name }}.data import MNISTDataModule  # noqa: E402
from {{ cookiecutter.package_name }}.errors import load_model  # noqa: E402
from {{ cookiecutter.package_name }}.models import Classifier  # noqa: E402
from {{ cookiecutter.package_name }}.serve import cpu_threads  # noqa: E402


def png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, batch_size: int, batch_timeout: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "{{ cookiecutter.package_name }}.serve", "--ckpt_path", str(checkpoint)]
    command += ["--port", str(port), "--max_batch_size", str(batch_size), "--batch_timeout", str(batch_timeout)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if server.poll() is not None:
            sys.exit(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.kill()
    sys.exit("the server did not start within 5 minutes")


async def load(url: str, bodies: list[dict], clients: int, seconds: float) -> tuple[float, list[float]]:
    """`clients` concurrent clients, each sending one request after the other: (requests/s, latencies in s)."""
    latencies, failed = [], 0
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients), timeout=60) as client:

        async def one_client(k: int, until: float, record: bool) -> None:
            nonlocal failed
            i = k
            while time.perf_counter() < until:
                start = time.perf_counter()
                answer = await client.post(f"{url}/predict", json=bodies[i % len(bodies)])
                if record:
                    latencies.append(time.perf_counter() - start)
                    failed += answer.status_code != 200
                i += clients

        warm = time.perf_counter() + min(1.0, seconds / 4)
        await asyncio.gather(*(one_client(k, warm, False) for k in range(clients)))
        begin = time.perf_counter()
        await asyncio.gather(*(one_client(k, begin + seconds, True) for k in range(clients)))
        elapsed = time.perf_counter() - begin
    if failed:
        sys.exit(f"{failed} requests failed")
    return len(latencies) / elapsed, latencies


def ceiling(model, images: torch.Tensor, batch_size: int, seconds: float) -> float:
    """Samples per second of `predict_step` on the decoded images, in batches of `batch_size`, with
    as many threads as the server's worker."""
    torch.set_num_threads(cpu_threads(1))
    x = images.float() / 255
    batches = [x[i : i + batch_size] for i in range(0, len(x) - batch_size + 1, batch_size)] or [x]
    done, begin = 0, time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - begin < seconds:
            for batch in batches:
                model.predict_step((batch,), 0)
                done += len(batch)
    return done / (time.perf_counter() - begin)


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", default="best", help="a checkpoint of an image model, or best / last")
    parser.add_argument("--log_dir", default="logs")
    parser.add_argument("--clients", default="1,8,64")
    parser.add_argument("--batch_sizes", default="1,8,32")
    parser.add_argument("--batch_timeout", type=float, default=0.005)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per cell")
    args = parser.parse_args()
    checkpoint = resolve_checkpoint(args.ckpt_path, Path(args.log_dir))
    model = load_model(Classifier, checkpoint, compile=False)
    data = MNISTDataModule(name="digits")
    data.setup("test")
    images = data.splits["test"][0]
    if tuple(images.shape[1:]) != tuple(model.hparams.input_shape):
        sys.exit(f"the benchmark sends the digits' 8x8 test images; {checkpoint} takes {model.hparams.input_shape}")
    bodies = [{"image": png(x[0].numpy())} for x in images]
    print(f"{checkpoint}; {len(bodies)} test images as PNG; {os.cpu_count()} CPU cores; {args.seconds:g} s per cell")
    print()
    print("| max_batch_size | clients | requests/s | p50 ms | p95 ms | p99 ms | in-process predict/s | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch_size in map(int, args.batch_sizes.split(",")):
        best = ceiling(model, images, batch_size, args.seconds)
        server, url = start_server(checkpoint, batch_size, args.batch_timeout)
        try:
            for clients in map(int, args.clients.split(",")):
                rate, latencies = asyncio.run(load(url, bodies, clients, args.seconds))
                p50, p95, p99 = (percentile(latencies, q) for q in (50, 95, 99))
                print(
                    f"| {batch_size} | {clients} | {rate:,.0f} | {p50:.1f} | {p95:.1f} | {p99:.1f} | {best:,.0f} "
                    f"| {rate / best:.3f} |",
                    flush=True,
                )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)


if __name__ == "__main__":
    main()
