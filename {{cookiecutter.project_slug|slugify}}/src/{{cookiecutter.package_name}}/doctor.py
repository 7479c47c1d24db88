"""Check this machine before training.

`python -m {{ cookiecutter.package_name }}.doctor`, installed as `{{ cookiecutter.project_slug }}-doctor` too.

Prints what PyTorch sees (its version and the CUDA / ROCm version it was built for, cuDNN,
NCCL, the NVIDIA driver, every GPU with its compute capability, memory, bf16 and TF32
support, Apple MPS), times a matrix product and a training step of the default model on
the best device, and names the usual install mistakes with the command that fixes them.

    python -m {{ cookiecutter.package_name }}.doctor                # the table, then "Problems:" or "No problems found"
    python -m {{ cookiecutter.package_name }}.doctor --json         # the same as JSON
    python -m {{ cookiecutter.package_name }}.doctor --require-gpu  # exit code 1 when no GPU is usable
    python -m {{ cookiecutter.package_name }}.doctor --bf16         # also: can the GPUs train in bf16?

The parts are separate so that tests can fake the machine: `probe()` gathers the facts
into a plain dict, `diagnose(facts)` is a pure function of that dict, `benchmark(device)`
measures.
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import torch

from .errors import print_error

# PyTorch's CUDA wheel indexes (https://download.pytorch.org/whl/cu<XYZ>), oldest first: the same
# choice as the README's install table. Each PyTorch release is published for a few of them (2.5:
# cu118/cu121/cu124; 2.9: cu126/cu128/cu130) and pip takes the newest release an index holds. Add new
# tags here (and to the README) when PyTorch publishes them.
CUDA_WHEELS = ("11.8", "12.1", "12.4", "12.6", "12.8", "13.0")
WHEEL_INDEX = "https://download.pytorch.org/whl/"
DRIVER_DOWNLOAD = "https://www.nvidia.com/Download/index.aspx"
GLOO_DDP = "--trainer.strategy=lightning.pytorch.strategies.DDPStrategy --trainer.strategy.process_group_backend=gloo"


# 1. Probes: each returns plain values (str, int, bool, list, dict), never raises.


def version_tuple(text: str | None) -> tuple[int, ...] | None:
    """'12.4' -> (12, 4); None or garbage -> None."""
    numbers = re.findall(r"\d+", text or "")
    return tuple(int(n) for n in numbers[:2]) if numbers else None


def parse_smi_query(text: str) -> tuple[str | None, list[str]]:
    """The driver version and the GPU names from `nvidia-smi --query-gpu=driver_version,name --format=csv,noheader`."""
    rows = [[cell.strip() for cell in line.split(",", 1)] for line in text.splitlines() if "," in line]
    return (rows[0][0] if rows else None), [row[1] for row in rows]


def parse_smi_cuda(text: str) -> str | None:
    """The newest CUDA version the driver supports, from the header of plain `nvidia-smi`."""
    found = re.search(r"CUDA Version\s*:\s*(\d+\.\d+)", text)
    return found.group(1) if found else None


def probe_driver(timeout: float = 10.0) -> dict | None:
    """The NVIDIA driver as `nvidia-smi` reports it; None when there is no `nvidia-smi`."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    driver = {"version": None, "cuda": None, "gpus": [], "error": None}
    try:
        query = [smi, "--query-gpu=driver_version,name", "--format=csv,noheader"]
        listed = subprocess.run(query, capture_output=True, text=True, timeout=timeout)
        plain = subprocess.run([smi], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as err:
        driver["error"] = f"nvidia-smi failed: {err}"
        return driver
    if listed.returncode != 0:
        output = (listed.stdout + listed.stderr).strip().splitlines()
        driver["error"] = output[0] if output else f"nvidia-smi exited with code {listed.returncode}"
        return driver
    driver["version"], driver["gpus"] = parse_smi_query(listed.stdout)
    driver["cuda"] = parse_smi_cuda(plain.stdout)
    return driver


def probe_cudnn() -> str | None:
    try:
        if not torch.backends.cudnn.is_available():
            return None
        v = torch.backends.cudnn.version()  # e.g. 90100 (9.1.0) or 8907 (8.9.7)
    except Exception:
        return None
    if not v:
        return None
    return f"{v // 10000}.{v % 10000 // 100}.{v % 100}" if v >= 10000 else f"{v // 1000}.{v % 1000 // 100}.{v % 100}"


def probe_nccl() -> tuple[str | None, bool]:
    """NCCL's version (RCCL on ROCm) and whether torch.distributed can use it."""
    try:
        available = torch.distributed.is_available() and torch.distributed.is_nccl_available()
    except Exception:
        available = False
    version = None
    if available and torch.cuda.is_available():
        try:
            v = torch.cuda.nccl.version()
            version = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception:
            version = None
    return version, bool(available)


def probe_devices() -> list[dict]:
    """Every GPU PyTorch can use (NVIDIA, or AMD on a ROCm build)."""
    devices = []
    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return devices
    for i in range(count):
        try:
            p = torch.cuda.get_device_properties(i)
        except Exception:
            continue
        nvidia = torch.version.hip is None
        ampere = (p.major, p.minor) >= (8, 0)
        if nvidia:
            bf16 = ampere
        else:
            with torch.cuda.device(i):
                bf16 = bool(torch.cuda.is_bf16_supported())
        devices.append(
            {
                "index": i,
                "name": p.name,
                "capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1),
                "bf16": bf16,
                "tf32": nvidia and ampere,  # TF32 tensor cores: NVIDIA Ampere (8.0) and newer
            }
        )
    return devices


def probe() -> dict:
    """Everything the report shows, as a plain dict (what `diagnose` reads)."""
    nccl, nccl_available = probe_nccl()
    try:
        cuda_available = torch.cuda.is_available()
    except Exception:
        cuda_available = False
    mps = getattr(torch.backends, "mps", None)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "os": sys.platform,
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "hip_build": getattr(torch.version, "hip", None),
        "cudnn": probe_cudnn(),
        "nccl": nccl,
        "nccl_available": nccl_available,
        "driver": probe_driver(),
        "cuda_available": cuda_available,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "devices": probe_devices(),
        "mps_available": bool(mps is not None and mps.is_available()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


# 2. Diagnoses: a pure function of the facts.


def cuda_wheel(driver_cuda: str | None) -> str | None:
    """The newest of PyTorch's CUDA wheel tags ('cu124') that a driver supporting `driver_cuda` runs."""
    supported = version_tuple(driver_cuda)
    if supported is None:
        return None
    fits = [v for v in CUDA_WHEELS if version_tuple(v) <= supported]
    return "cu" + fits[-1].replace(".", "") if fits else None


def reinstall(tag: str) -> str:
    return f"pip uninstall -y torch && pip install torch --index-url {WHEEL_INDEX}{tag}"


def gpu_usable(facts: dict) -> bool:
    return bool(facts.get("cuda_available") and facts.get("devices")) or bool(facts.get("mps_available"))


def diagnose(facts: dict, want_bf16: bool = False) -> list[tuple[str, str, str]]:
    """The problems in `facts` (from `probe`) as (level, problem, fix) with level 'error' or 'warning'.

    want_bf16: bf16 training is intended (--trainer.precision=bf16-mixed).
    """
    problems = []
    driver = facts.get("driver") or {}
    driver_cuda = driver.get("cuda")
    build = facts.get("cuda_build")
    nvidia = bool(driver.get("version") or driver.get("gpus"))
    gpus = ", ".join(driver.get("gpus") or []) or "an NVIDIA GPU"
    tag = cuda_wheel(driver_cuda)
    if driver.get("error"):
        problems.append(
            (
                "error",
                f"nvidia-smi is installed but fails: {driver['error']}",
                f"reinstall or load the NVIDIA driver ({DRIVER_DOWNLOAD}; on Linux a reboot after a driver "
                "update often helps), then run nvidia-smi again",
            )
        )

    if nvidia and build is None and not facts.get("hip_build"):
        what = f"PyTorch {facts.get('torch')} is a CPU-only build, but this machine has {gpus}"
        what += f" (driver {driver.get('version')}, CUDA up to {driver_cuda})" if driver_cuda else ""
        if tag:
            fix = reinstall(tag)
        elif driver_cuda:
            fix = f"update the NVIDIA driver ({DRIVER_DOWNLOAD}): CUDA {driver_cuda} is older than any PyTorch wheel"
        else:
            fix = f"install a CUDA build: {reinstall('cu126')} (pick the tag for your driver at https://pytorch.org)"
        problems.append(("error", what, fix))
    elif nvidia and build and driver_cuda and version_tuple(build) > version_tuple(driver_cuda):
        major_newer = version_tuple(build)[0] > version_tuple(driver_cuda)[0]
        broken = major_newer or not facts.get("cuda_available")
        what = f"PyTorch is built for CUDA {build}, but the NVIDIA driver {driver.get('version')} "
        what += f"supports CUDA up to {driver_cuda}"
        what += (
            ": CUDA cannot start"
            if broken
            else " (it runs by CUDA minor-version compatibility, but kernels compiled at run time may fail)"
        )
        fix = f"update the NVIDIA driver ({DRIVER_DOWNLOAD})"
        fix += f", or install the build for your driver: {reinstall(tag)}" if tag else ""
        problems.append(("error" if broken else "warning", what, fix))
    elif nvidia and build and not facts.get("cuda_available"):
        visible = facts.get("cuda_visible_devices")
        if visible is not None and visible.strip() in ("", "-1", "none", "None"):
            problems.append(
                (
                    "error",
                    f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU from PyTorch",
                    "unset CUDA_VISIBLE_DEVICES (or set it to the GPUs to use, e.g. CUDA_VISIBLE_DEVICES=0)",
                )
            )
        else:
            problems.append(
                (
                    "error",
                    f"PyTorch (CUDA {build}) and the NVIDIA driver are installed, "
                    "but torch.cuda.is_available() is False",
                    'python -c "import torch; torch.cuda.init()"  # prints why CUDA does not start',
                )
            )

    devices = facts.get("devices") or []
    if len(devices) > 1 and not facts.get("nccl_available"):
        what = f"{len(devices)} GPUs but this PyTorch has no NCCL: multi-GPU (DDP) training cannot use it"
        if facts.get("os") == "win32":
            fix = (
                f"use Linux or WSL2 (PyTorch's Linux CUDA wheels ship NCCL), or run DDP over gloo (slower): {GLOO_DDP}"
            )
        else:
            fix = f"install PyTorch's Linux CUDA wheel, which ships NCCL: {reinstall(tag or 'cu126')}"
        problems.append(("warning", what, fix))

    if want_bf16 and facts.get("cuda_available"):
        for d in devices:
            if not d.get("bf16"):
                problems.append(
                    (
                        "warning",
                        f"bf16 requested, but GPU {d['index']} ({d['name']}, compute capability {d['capability']}) "
                        "has no bfloat16 (it needs 8.0, Ampere, or newer); the command line falls back to float16",
                        "--trainer.precision=16-mixed",
                    )
                )
    return problems


# 3. Benchmark: a matrix product and a training step on one device.


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def best_device(facts: dict) -> str:
    if facts.get("cuda_available") and facts.get("devices"):
        return "cuda"
    return "mps" if facts.get("mps_available") else "cpu"


def timed(fn, device: torch.device, min_seconds: float, min_reps: int) -> list[float]:
    """Run `fn` once to warm up, then for at least `min_seconds` and `min_reps` runs; the seconds of each run."""
    fn()
    synchronize(device)
    times, start = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_seconds:
        begin = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - begin)
    return times


def benchmark(device: str = "cpu", seconds: float = 0.3) -> dict:
    """TFLOP/s of an n x n matrix product and the time of one training step of the default model."""
    import torch.nn.functional as F

    from .models import Classifier

    dev = torch.device(device)
    if dev.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        n, dtype = 8192, torch.bfloat16 if bf16 else torch.float16
    elif dev.type == "mps":
        n, dtype = 4096, torch.float32
    else:
        n, dtype = 2048, torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    times = timed(lambda: a @ b, dev, seconds, 3)
    reps, elapsed = len(times), sum(times)
    result = {
        "device": str(dev) if dev.type != "cuda" else f"cuda ({torch.cuda.get_device_name(dev)})",
        "matmul": f"{n}x{n} {str(dtype).removeprefix('torch.')}",
        "matmul_reps": reps,
        "matmul_tflops": round(2 * n**3 * reps / elapsed / 1e12, 3),
    }

    torch.manual_seed(0)
    model = Classifier().to(dev).train()  # the default: MLP 784-256-256-10
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(64, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (64,), device=dev)
    losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    times = sorted(timed(step, dev, seconds / 3, 5))
    result["train_step"] = "MLP 784-256-256-10, batch 64, float32, AdamW"
    result["train_step_ms"] = round(1000 * times[len(times) // 2], 3)  # the median: robust to a busy machine
    result["train_loss_finite"] = bool(torch.isfinite(torch.stack(losses)).all())
    return result


# 4. The report.


def rows(facts: dict, bench: dict | None) -> list[tuple[str, str]]:
    driver = facts.get("driver")
    if driver is None:
        driver_text = "not found (no nvidia-smi)"
    elif driver.get("error"):
        driver_text = f"nvidia-smi fails: {driver['error']}"
    else:
        driver_text = f"{driver.get('version')} (supports CUDA up to {driver.get('cuda') or '?'})"
    build = facts.get("cuda_build")
    kind = f"CUDA {build}" if build else f"ROCm {facts['hip_build']}" if facts.get("hip_build") else "CPU-only"
    table = [
        ("Python", f"{facts.get('python')} ({facts.get('platform')})"),
        ("PyTorch", f"{facts.get('torch')} ({kind} build)"),
        ("CUDA build", build or "none"),
    ]
    if facts.get("hip_build"):
        table.append(("ROCm build", facts["hip_build"]))
    nccl = facts.get("nccl") or ("available" if facts.get("nccl_available") else "not available")
    table += [("cuDNN", facts.get("cudnn") or "none"), ("NCCL", nccl), ("NVIDIA driver", driver_text)]
    if driver and driver.get("gpus") and not facts.get("devices"):
        table.append(("GPUs (nvidia-smi)", ", ".join(driver["gpus"])))
    devices = facts.get("devices") or []
    usable = f"yes, {len(devices)} device{'s' * (len(devices) != 1)}" if facts.get("cuda_available") else "no"
    table.append(("CUDA usable", usable))
    for d in devices:
        yes = {True: "yes", False: "no"}
        table.append(
            (
                f"GPU {d['index']}",
                f"{d['name']}, compute capability {d['capability']}, {d['memory_gib']} GiB, "
                f"bf16 {yes[bool(d['bf16'])]}, TF32 {yes[bool(d['tf32'])]}",
            )
        )
    table.append(("Apple MPS", "available" if facts.get("mps_available") else "not available"))
    table.append(("CPU", f"{facts.get('cpu_count')} cores, {facts.get('torch_threads')} PyTorch threads"))
    if bench is not None and "error" in bench:
        table.append(("Benchmark", f"failed on {bench.get('device')}: {bench['error']}"))
    elif bench is not None:
        table.append(("Matmul", f"{bench['device']}, {bench['matmul']}: {bench['matmul_tflops']:.3f} TFLOP/s"))
        table.append(("Training step", f"{bench['device']}, {bench['train_step']}: {bench['train_step_ms']:.2f} ms"))
    return table


def report(facts: dict, problems: list, bench: dict | None) -> str:
    table = rows(facts, bench)
    width = max(len(name) for name, _ in table) + 2
    lines = [f"{name:<{width}}{value}" for name, value in table]
    if problems:
        lines += ["", "Problems:"]
        for level, problem, fix in problems:
            lines += [f"  {level.upper()}: {problem}", f"    fix: {fix}"]
    else:
        lines += ["", "No problems found"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m {{ cookiecutter.package_name }}.doctor",
        description="Check PyTorch, CUDA and the GPUs of this machine, and time a training step.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--require-gpu", action="store_true", help="exit with code 1 when no GPU is usable")
    parser.add_argument("--bf16", action="store_true", help="check that the GPUs can train in bf16 (bf16-mixed)")
    parser.add_argument("--precision", help="the --trainer.precision you mean to use (bf16-mixed implies --bf16)")
    parser.add_argument("--skip-benchmark", action="store_true", help="do not time the matmul and training step")
    args = parser.parse_args(argv)

    facts = probe()
    problems = diagnose(facts, want_bf16=args.bf16 or str(args.precision or "").startswith("bf16"))
    bench = None
    if not args.skip_benchmark:
        device = best_device(facts)
        try:
            bench = benchmark(device)
        except Exception as err:  # a broken GPU setup is what this command is for: report, do not crash
            first = (str(err).strip().splitlines() or [""])[0][:200]
            bench = {"device": device, "error": f"{type(err).__name__}: {first}"}
            check = f"python -c \"import torch; x = torch.ones(4, 4, device='{device}'); print(x @ x)\""
            problems.append(
                ("error", f"the benchmark failed on {device}: {bench['error']}", f"{check}  # the full error")
            )
    usable = gpu_usable(facts)
    if args.json:
        keys = ("level", "problem", "fix")
        data = {
            "facts": facts,
            "gpu_usable": usable,
            "benchmark": bench,
            "problems": [dict(zip(keys, p)) for p in problems],
        }
        print(json.dumps(data, indent=2))
    else:
        print(report(facts, problems, bench))
    if args.require_gpu and not usable:
        errors = [p for p in problems if p[0] == "error"]
        if errors:
            why, fix = errors[0][1], errors[0][2]
        else:
            why = "PyTorch sees no GPU (torch.cuda.is_available() is False, no NVIDIA driver found, no Apple MPS)"
            fix = "run on a machine with a GPU, or train on the CPU without --require-gpu (configs/trainer/cpu.yaml)"
        return print_error(f"--require-gpu: no usable GPU: {why}. Fix: {fix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
