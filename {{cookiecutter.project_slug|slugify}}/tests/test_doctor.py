"""The environment doctor: its diagnoses over faked machines, its exit codes and JSON, and a real run here."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from {{ cookiecutter.package_name }} import doctor

H100 = {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "memory_gib": 79.1, "bf16": True, "tf32": True}
T4 = {"name": "Tesla T4", "capability": "7.5", "memory_gib": 14.6, "bf16": False, "tf32": False}


def cpu_machine(**changes) -> dict:
    """The facts of a laptop without a GPU and with the CPU build of PyTorch."""
    facts = {
        "python": "3.11.7",
        "platform": "Linux-6.8-x86_64",
        "os": "linux",
        "torch": "2.8.0+cpu",
        "cuda_build": None,
        "hip_build": None,
        "cudnn": None,
        "nccl": None,
        "nccl_available": False,
        "driver": None,
        "cuda_available": False,
        "cuda_visible_devices": None,
        "devices": [],
        "mps_available": False,
        "cpu_count": 8,
        "torch_threads": 8,
    }
    return {**facts, **changes}


def gpu_machine(gpus=(H100, H100), driver_cuda="12.8", build="12.8", **changes) -> dict:
    """A Linux machine with NVIDIA GPUs, a driver supporting `driver_cuda` and PyTorch built for `build`."""
    devices = [{"index": i, **gpu} for i, gpu in enumerate(gpus)]
    driver = {"version": "570.124.06", "cuda": driver_cuda, "gpus": [g["name"] for g in gpus], "error": None}
    facts = cpu_machine(
        torch=f"2.8.0+cu{build.replace('.', '')}",
        cuda_build=build,
        cudnn="9.10.2",
        nccl="2.27.3",
        nccl_available=True,
        driver=driver,
        cuda_available=True,
        devices=devices,
    )
    return {**facts, **changes}


def cpu_torch_with_driver(driver_cuda: str) -> dict:
    """PyTorch's CPU build installed on a machine with an NVIDIA GPU and driver."""
    gpu = gpu_machine(gpus=(H100,), driver_cuda=driver_cuda)
    return cpu_machine(driver=gpu["driver"])


def test_a_cpu_machine_and_a_healthy_gpu_machine_have_no_problems():
    assert doctor.diagnose(cpu_machine()) == []
    assert doctor.diagnose(cpu_machine(), want_bf16=True) == []  # bf16 on a CPU works (slowly)
    assert doctor.diagnose(gpu_machine()) == []
    assert doctor.diagnose(gpu_machine(), want_bf16=True) == []
    assert doctor.diagnose(cpu_machine(mps_available=True, os="darwin")) == []


@pytest.mark.parametrize(
    ("driver_cuda", "wheel"),
    [("11.8", "cu118"), ("12.0", "cu118"), ("12.4", "cu124"), ("12.5", "cu124"), ("12.8", "cu128"), ("13.2", "cu130")],
)
def test_cpu_only_torch_with_a_driver_recommends_the_newest_wheel_the_driver_runs(driver_cuda, wheel):
    problems = doctor.diagnose(cpu_torch_with_driver(driver_cuda))

    assert len(problems) == 1
    level, problem, fix = problems[0]
    assert level == "error"
    assert "CPU-only build" in problem and "NVIDIA H100" in problem and f"CUDA up to {driver_cuda}" in problem
    # Uninstalling first: `pip install torch` alone would keep the installed CPU build.
    assert fix == f"pip uninstall -y torch && pip install torch --index-url https://download.pytorch.org/whl/{wheel}"


def test_cpu_only_torch_with_a_driver_older_than_every_wheel_says_update_the_driver():
    ((level, _, fix),) = doctor.diagnose(cpu_torch_with_driver("11.4"))
    assert level == "error"
    assert "update the NVIDIA driver" in fix and "https://www.nvidia.com/Download/index.aspx" in fix
    assert "pip install" not in fix


def test_cuda_build_newer_than_the_driver():
    # A new major version cannot run on the old driver.
    ((level, problem, fix),) = doctor.diagnose(gpu_machine(build="13.0", driver_cuda="12.4", cuda_available=False))
    assert level == "error"
    assert "built for CUDA 13.0" in problem and "supports CUDA up to 12.4" in problem
    assert "https://www.nvidia.com/Download/index.aspx" in fix
    assert fix.endswith("--index-url https://download.pytorch.org/whl/cu124")
    # A newer minor version of the same major runs by minor-version compatibility: a warning.
    ((level, problem, fix),) = doctor.diagnose(gpu_machine(build="12.8", driver_cuda="12.4"))
    assert level == "warning" and "minor-version compatibility" in problem and fix.endswith("whl/cu124")
    # ... unless CUDA does not start.
    ((level, _, _),) = doctor.diagnose(gpu_machine(build="12.8", driver_cuda="12.4", cuda_available=False))
    assert level == "error"
    # An older build than the driver supports is fine.
    assert doctor.diagnose(gpu_machine(build="12.6", driver_cuda="12.8")) == []


def test_no_nccl_with_several_gpus():
    ((level, problem, fix),) = doctor.diagnose(gpu_machine(nccl=None, nccl_available=False))
    assert level == "warning" and "2 GPUs" in problem and "NCCL" in problem
    assert fix.endswith("--index-url https://download.pytorch.org/whl/cu128")
    # On Windows PyTorch has no NCCL at all: Linux / WSL2, or DDP over gloo.
    ((_, _, fix),) = doctor.diagnose(gpu_machine(nccl=None, nccl_available=False, os="win32"))
    assert "WSL2" in fix and "--trainer.strategy.process_group_backend=gloo" in fix
    # One GPU needs no NCCL.
    assert doctor.diagnose(gpu_machine(gpus=(H100,), nccl=None, nccl_available=False)) == []


def test_bf16_requested_on_a_gpu_without_it():
    facts = gpu_machine(gpus=(T4,), build="12.6", driver_cuda="12.6")
    assert doctor.diagnose(facts) == []
    ((level, problem, fix),) = doctor.diagnose(facts, want_bf16=True)
    assert level == "warning"
    assert "Tesla T4" in problem and "compute capability 7.5" in problem
    assert fix == "--trainer.precision=16-mixed"


def test_cuda_hidden_by_cuda_visible_devices():
    facts = gpu_machine(cuda_available=False, devices=[], cuda_visible_devices="")
    ((level, problem, fix),) = doctor.diagnose(facts)
    assert level == "error" and "CUDA_VISIBLE_DEVICES" in problem and "unset CUDA_VISIBLE_DEVICES" in fix
    ((level, problem, _),) = doctor.diagnose({**facts, "cuda_visible_devices": None})
    assert level == "error" and "torch.cuda.is_available() is False" in problem


def test_wheel_choice():
    assert doctor.cuda_wheel("12.4") == "cu124"
    assert doctor.cuda_wheel("12.9") == "cu128"
    assert doctor.cuda_wheel("12.10") == "cu128"  # 12.10 is newer than 12.8, not 12.1
    assert doctor.cuda_wheel("11.7") is None
    assert doctor.cuda_wheel(None) is None


def test_wheel_list_is_the_readmes():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    in_readme = set(re.findall(r"download\.pytorch\.org/whl/(cu\d+)", text))
    assert in_readme == {"cu" + v.replace(".", "") for v in doctor.CUDA_WHEELS}


@pytest.mark.skipif(sys.platform == "win32", reason="the fake nvidia-smi is a shell script")
def test_driver_probe_reads_nvidia_smi(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--query-gpu=driver_version,name" ]; then\n'
        '  echo "550.54.15, NVIDIA A100-SXM4-40GB"; echo "550.54.15, NVIDIA A100-SXM4-40GB"; exit 0\n'
        "fi\n"
        'echo "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4     |"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    driver = doctor.probe_driver()

    assert driver == {"version": "550.54.15", "cuda": "12.4", "gpus": ["NVIDIA A100-SXM4-40GB"] * 2, "error": None}
    # A driver that is installed but not loaded.
    fake.write_text(
        '#!/bin/sh\necho "NVIDIA-SMI has failed because it couldn\'t communicate with the driver"\nexit 9\n'
    )
    driver = doctor.probe_driver()
    assert driver["version"] is None and "couldn't communicate" in driver["error"]
    ((level, _, fix),) = doctor.diagnose(cpu_machine(driver=driver))
    assert level == "error" and "driver" in fix


def test_require_gpu_exit_codes(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "probe", cpu_machine)
    assert doctor.main(["--skip-benchmark"]) == 0
    assert doctor.main(["--skip-benchmark", "--require-gpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR: --require-gpu: no usable GPU")

    # A GPU machine with the CPU build: the reason and its fix are the diagnosis'.
    monkeypatch.setattr(doctor, "probe", lambda: cpu_torch_with_driver("12.6"))
    assert doctor.main(["--skip-benchmark", "--require-gpu"]) == 1
    assert "pip install torch --index-url https://download.pytorch.org/whl/cu126" in capsys.readouterr().err

    monkeypatch.setattr(doctor, "probe", gpu_machine)
    assert doctor.main(["--skip-benchmark", "--require-gpu"]) == 0
    assert capsys.readouterr().err == ""


def test_table_lists_devices_and_problems(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "probe", lambda: gpu_machine(gpus=(T4,), build="12.6", driver_cuda="12.6"))

    assert doctor.main(["--skip-benchmark", "--precision", "bf16-mixed"]) == 0

    out = capsys.readouterr().out
    assert "PyTorch        2.8.0+cu126 (CUDA 12.6 build)" in out
    assert "NVIDIA driver  570.124.06 (supports CUDA up to 12.6)" in out
    assert "GPU 0          Tesla T4, compute capability 7.5, 14.6 GiB, bf16 no, TF32 no" in out
    assert "Problems:\n  WARNING: bf16 requested" in out and "fix: --trainer.precision=16-mixed" in out

    monkeypatch.setattr(doctor, "probe", gpu_machine)
    doctor.main(["--skip-benchmark"])
    assert capsys.readouterr().out.rstrip().endswith("No problems found")


def test_json_report(monkeypatch, capsys):
    facts = gpu_machine(gpus=(T4,), build="12.6", driver_cuda="12.6")
    monkeypatch.setattr(doctor, "probe", lambda: facts)

    assert doctor.main(["--skip-benchmark", "--json", "--bf16"]) == 0

    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"facts", "gpu_usable", "benchmark", "problems"}
    assert report["facts"] == facts and report["gpu_usable"] is True and report["benchmark"] is None
    assert [p["fix"] for p in report["problems"]] == ["--trainer.precision=16-mixed"]
    assert set(report["problems"][0]) == {"level", "problem", "fix"}


def test_real_run_on_this_machine(capsys):
    assert doctor.main(["--json"]) == 0

    report = json.loads(capsys.readouterr().out)
    facts, bench = report["facts"], report["benchmark"]
    assert facts["torch"] == torch.__version__ and facts["cuda_build"] == torch.version.cuda
    assert facts["cuda_available"] == torch.cuda.is_available()
    assert len(facts["devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert bench["matmul_tflops"] > 0 and bench["train_step_ms"] > 0 and bench["train_loss_finite"]
    expected = "cuda" if torch.cuda.is_available() else "mps" if facts["mps_available"] else "cpu"
    assert bench["device"].startswith(expected)


def test_python_dash_m_doctor():
    pythonpath = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "{{ cookiecutter.package_name }}.doctor", "--skip-benchmark"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": pythonpath},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Python ") and f"PyTorch        {torch.__version__} (" in result.stdout
    assert "Matmul" not in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run pytest -m gpu on a GPU machine)")
def test_real_run_on_a_gpu(capsys):
    assert doctor.main(["--require-gpu"]) == 0

    out = capsys.readouterr().out
    name = torch.cuda.get_device_name(0)
    assert f"GPU 0          {name}, compute capability" in out
    assert "Matmul         cuda (" in out and "TFLOP/s" in out
    facts = doctor.probe()
    assert facts["devices"][0]["memory_gib"] > 0
    assert facts["cudnn"] is not None and facts["driver"]["cuda"] is not None
    bench = doctor.benchmark("cuda")
    assert bench["matmul"].endswith(("bfloat16", "float16"))
    # The figure is reported, not judged: how fast a GPU is belongs to benchmarks, not to a test.
    assert math.isfinite(bench["matmul_tflops"]) and bench["matmul_tflops"] > 0
