"""The hardware recipes that run in one process on a CPU: the presets in configs/trainer/,
the GPU settings (with the GPU faked), gradient accumulation and clipping, compile's
checkpoint keys, and the README's table of recipes. Multi-process runs: test_distributed.py."""
{% if cookiecutter.cluster == "yes" %}
import os
{%- endif %}
import re
import shlex
{%- if cookiecutter.cluster == "yes" %}
import subprocess
{%- endif %}

import pytest
import torch
import yaml
from conftest import ROOT, SMALL, run_cli
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.strategies import FSDPStrategy, Strategy

from {{ cookiecutter.package_name }}.cli import run, setup_hardware
from {{ cookiecutter.package_name }}.models import Classifier
from {{ cookiecutter.package_name }}.models.nets import Block

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

PRESETS = ROOT / "configs" / "trainer"
CNN = str(ROOT / "configs" / "mnist_cnn.yaml")


def preset(name: str) -> str:
    return f"--config={PRESETS / name}.yaml"


def summary_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("Effective batch size")]


def test_every_preset_sets_only_trainer_options():
    names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    assert names == ["cpu", "ddp", "fsdp", "gpu"{% if cookiecutter.cluster == "yes" %}, "multinode"{% endif %}]
    for name in names:
        config = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())
        assert list(config) == ["trainer"], name
        # A list here would replace the run config's callbacks (checkpoints) instead of adding to them.
        assert "callbacks" not in config["trainer"] and "logger" not in config["trainer"], name


# --- GPU settings, with torch.cuda's answers faked --------------------------------------------


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA machine as far as the CLI can tell; `fake_gpu(bf16=False)` makes it a pre-Ampere one."""
    before = torch.get_float32_matmul_precision()

    def fake(bf16: bool = True, name: str = "Tesla V100-SXM2-16GB"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)

    yield fake
    torch.set_float32_matmul_precision(before)


def trainer_options(**options) -> Namespace:
    defaults = {"accelerator": "gpu", "precision": "bf16-mixed", "strategy": "auto", "sync_batchnorm": False}
    return Namespace(**{**defaults, **options})


def test_cpu_run_is_left_alone(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = torch.get_float32_matmul_precision()
    options = trainer_options(accelerator="auto")
    setup_hardware(options)
    assert options.precision == "bf16-mixed"  # bf16 autocast runs on CPUs too
    assert torch.get_float32_matmul_precision() == before
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "auto"])
def test_gpu_with_bf16_keeps_it_and_gets_tf32(fake_gpu, capsys, accelerator):
    fake_gpu(bf16=True)
    torch.set_float32_matmul_precision("highest")
    options = trainer_options(accelerator=accelerator)
    setup_hardware(options)
    assert options.precision == "bf16-mixed"
    assert torch.get_float32_matmul_precision() == "high"  # TF32 matrix products
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("given", "used"), [("bf16-mixed", "16-mixed"), ("bf16-true", "16-true"), ("32-true", "32-true")]
)
def test_gpu_without_bf16_falls_back_to_float16(fake_gpu, capsys, given, used):
    fake_gpu(bf16=False, name="Tesla T4")
    options = trainer_options(precision=given)
    setup_hardware(options)
    assert options.precision == used
    expected = f"This GPU (Tesla T4) has no bfloat16: precision {used}, not {given}\n" if used != given else ""
    assert capsys.readouterr().out == expected


def test_gpu_fallback_reaches_the_trainer(fake_gpu, workdir, monkeypatch, capsys):
    """Through the whole command line: the Trainer is built with 16-mixed (on the CPU, as the GPU is fake)."""
    fake_gpu(bf16=False, name="Tesla T4")
    captured = {}

    def stop(self):  # capture the options the Trainer would get, then stop before building it
        captured.update(self.config[self.subcommand].trainer)
        raise SystemExit(0)

    monkeypatch.setattr("{{ cookiecutter.package_name }}.cli.CLI.instantiate_classes", stop)
    with pytest.raises(SystemExit):
        run(["fit", f"--config={CNN}", preset("gpu"), *SMALL])
    assert captured["precision"] == "16-mixed" and captured["accelerator"] == "gpu"
    assert "has no bfloat16: precision 16-mixed, not bf16-mixed" in capsys.readouterr().out


# --- each preset in one process on the CPU ---------------------------------------------------


def test_cpu_preset(workdir, capsys):
    cli = run(["fit", f"--config={CNN}", preset("cpu"), *SMALL, "--trainer.fast_dev_run=true"])
    assert cli.trainer.global_step == 1
    assert type(cli.trainer.accelerator).__name__ == "CPUAccelerator" and cli.trainer.precision == "32-true"
    assert summary_lines(capsys.readouterr().out) == [
        "Effective batch size 128 = 128 per device x 1 accumulation x 1 device x 1 node; "
        "precision 32-true; strategy single_device"
    ]


def test_gpu_preset_with_bf16_runs_on_the_cpu(workdir, capsys):
    args = [f"--config={CNN}", preset("gpu"), "--trainer.accelerator=cpu", *SMALL, "--trainer.fast_dev_run=true"]
    cli = run(["fit", *args])
    assert cli.trainer.global_step == 1 and cli.trainer.precision == "bf16-mixed"
    # The forward pass really runs in bfloat16 under autocast.
    x = torch.randn(2, 1, 28, 28)
    with cli.trainer.precision_plugin.forward_context():
        assert cli.model(x).dtype == torch.bfloat16
    assert summary_lines(capsys.readouterr().out) == [
        "Effective batch size 128 = 128 per device x 1 accumulation x 1 device x 1 node; "
        "precision bf16-mixed; strategy single_device"
    ]


def expect_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        run_cli(*args)
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("ERROR: "), lines
    return lines[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_preset_without_a_gpu_is_one_error_line(workdir, capsys):
    error = expect_error(capsys, "fit", preset("gpu"), *SMALL)
    assert "--trainer.accelerator=gpu" in error and "no GPU" in error and "configs/trainer/cpu.yaml" in error


def test_fsdp_preset_builds_block_wise_sharding_and_checkpointing():
    """What fsdp.yaml asks Lightning for; the run itself needs a GPU (test_distributed.py, -m gpu)."""
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    config = yaml.safe_load((PRESETS / "fsdp.yaml").read_text())["trainer"]
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": config["strategy"]})).strategy
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy._state_dict_type == "full"  # single-file checkpoints, loadable without FSDP


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_fsdp_on_the_cpu_is_one_error_line(workdir, capsys):
    """Lightning refuses FSDP without a GPU; the CLI says so in one line and names the alternative."""
    error = expect_error(capsys, "fit", preset("fsdp"), "--trainer.accelerator=cpu", *SMALL)
    assert "FSDP runs on NVIDIA GPUs only" in error and "configs/trainer/ddp.yaml" in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_sync_batchnorm_on_the_cpu_is_one_error_line(workdir, capsys):
    error = expect_error(capsys, "fit", f"--config={CNN}", preset("ddp"), "--trainer.sync_batchnorm=true", *SMALL)
    assert "--trainer.sync_batchnorm=true needs NVIDIA GPUs" in error


# --- accumulation and clipping -----------------------------------------------------------------


@pytest.mark.parametrize("accumulate", [1, 2, 4, 8])
def test_accumulation_steps_the_optimizer_once_per_accumulated_batches(workdir, capsys, accumulate):
    cli = run(["fit", *SMALL, "--trainer.max_epochs=2", "--trainer.limit_train_batches=8",
               "--trainer.limit_val_batches=1", f"--trainer.accumulate_grad_batches={accumulate}",
               "--trainer.callbacks+=probe.Probe"])  # fmt: skip
    probe = next(c for c in cli.trainer.callbacks if type(c).__name__ == "Probe")
    assert probe.optimizer_steps == 2 * 8 // accumulate  # two epochs of 8 batches
    assert cli.trainer.global_step == probe.optimizer_steps
    assert summary_lines(capsys.readouterr().out) == [
        f"Effective batch size {64 * accumulate} = 64 per device x {accumulate} accumulation x 1 device x 1 node; "
        "precision 32-true; strategy single_device"
    ]


@pytest.mark.parametrize("clip", ["null", 0.05])
def test_gradient_clipping_bounds_the_gradient_norm(workdir, clip):
    cli = run(["fit", *SMALL, "--trainer.max_epochs=1", "--trainer.limit_train_batches=5",
               "--trainer.limit_val_batches=1", f"--trainer.gradient_clip_val={clip}",
               "--trainer.callbacks+=probe.Probe"])  # fmt: skip
    norms = next(c for c in cli.trainer.callbacks if type(c).__name__ == "Probe").grad_norms
    assert len(norms) == 5
    if clip == "null":
        assert max(norms) > 0.05  # so that the bound below means something
    else:
        assert max(norms) <= clip * (1 + 1e-4)


def test_run_configs_name_accumulation_and_clipping():
    """Both are plain trainer options, visible in the default config every run starts from."""
    trainer = yaml.safe_load((ROOT / "configs" / "digits_mlp.yaml").read_text())["trainer"]
    assert trainer["accumulate_grad_batches"] == 1 and "gradient_clip_val" in trainer


# --- compile -----------------------------------------------------------------------------------


def test_compile_keeps_the_checkpoint_keys():
    plain = Classifier(backbone="vit", width=32, depth=2)
    compiled = Classifier(backbone="vit", width=32, depth=2, compile=True)
    assert isinstance(compiled.compiled, torch._dynamo.eval_frame.OptimizedModule) and plain.compiled is None
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert all("_orig_mod" not in name for name, _ in compiled.named_modules())
    plain.load_state_dict(compiled.state_dict())  # strict: checkpoints interchange both ways
    compiled.load_state_dict(plain.state_dict())


# --- the README's recipes ----------------------------------------------------------------------


def readme_recipes() -> list[tuple[str, str, str]]:
    """(goal, command, expected line) per row of the README's Recipes table."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Recipes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (.+?) \| `(.+?)` \| `(.+?)` \|$", table, flags=re.M)
    assert len(rows) >= 8, table
    return rows


def train_py_args(command: str, tmp_path) -> list[str]:
    """The options a recipe gives train.py: after `train.py`{% if cookiecutter.cluster == "yes" %}, or those the SLURM script passes to srun{% endif %}."""
    args = shlex.split(command)
{%- if cookiecutter.cluster == "yes" %}
    if args[0] != "sbatch":
        return args[args.index("train.py") + 1 :]
    assert args[1:] == ["scripts/slurm.sbatch"], command
    fake = tmp_path / "bin"
    fake.mkdir(parents=True)
    (fake / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')  # prints the command it would start
    (fake / "srun").chmod(0o755)
    env = {"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "1",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "4"}  # fmt: skip
    started = subprocess.run(["bash", "scripts/slurm.sbatch"], env=env, capture_output=True, text=True, check=True)
    words = started.stdout.splitlines()
    return words[words.index("train.py") + 1 :]
{%- else %}
    return args[args.index("train.py") + 1 :]
{%- endif %}


def test_readme_recipes_parse_and_promise_consistent_lines(monkeypatch, tmp_path, capsys):
    """Each recipe's train.py options are valid, and its expected line adds up and names the precision."""
    monkeypatch.chdir(ROOT)
    for goal, command, line in readme_recipes():
        with pytest.raises(SystemExit) as exit_:
            run([*train_py_args(command, tmp_path), "--print_config"])
        assert exit_.value.code in (0, None), goal
        config = yaml.safe_load(capsys.readouterr().out)
        found = re.fullmatch(
            r"Effective batch size (\d+) = (\d+) per device x (\d+) accumulation x (\d+) devices? x (\d+) nodes?; "
            r"precision (\S+); strategy (\w+)(; backbone compiled \(torch.compile\))?",
            line,
        )
        assert found, (goal, line)
        total, batch, accumulate, devices, nodes = map(int, found.groups()[:5])
        trainer = config["trainer"]
        assert total == batch * accumulate * devices * nodes, goal
        assert batch == config["data"]["init_args"]["batch_size"], goal
        assert accumulate == trainer["accumulate_grad_batches"], goal
        assert nodes == trainer["num_nodes"], goal
        # A count, not "auto": with "auto" the line the README promises would depend on the machine.
        assert str(trainer["devices"]).isdigit(), (goal, trainer["devices"])
        assert devices == int(trainer["devices"]), goal
        assert found[6] == trainer["precision"], goal
        strategy = trainer["strategy"] if isinstance(trainer["strategy"], str) else trainer["strategy"]["class_path"]
        expected = {"auto": "single_device" if devices * nodes == 1 else "ddp"}.get(strategy, strategy)
        assert found[7] == expected.rsplit(".", 1)[-1].removesuffix("Strategy").lower(), goal
        assert bool(found[8]) == config["model"]["init_args"]["compile"], goal
