"""The command line: `python train.py fit|validate|test|predict [--config FILE] [--key=value]`.

LightningCLI builds the model, the data and the Trainer from YAML and flags. This file
adds what a user should not have to think about: the data's class count and input shape
flow into the model, `--ckpt_path=best|last` finds the newest such checkpoint of the run,
`validate`, `test` and `predict` of a run's checkpoint add their results to that run, and
mistakes come out as one `ERROR:` line instead of a traceback.

Hardware is the Trainer's business (configs/trainer/*.yaml); here only: TF32 matrix
products on NVIDIA GPUs, bf16 falling back to float16 on GPUs without bfloat16, and one
line at the start of `fit` with the effective batch size and the precision.
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import Callback, ModelSummary, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO

from .callbacks import LayerTable, PredictionWriter, TensorBoardViews
from .checkpointing import AtomicCheckpointIO
from .errors import (
    UserError,
    effective_batch_size,
    first_line,
    print_error,
    rank_zero_print,
    read_checkpoint,
    weights_mismatch,
)
from .quiet import quiet

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "digits_mlp.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
EVALUATIONS = ("validate", "test", "predict")
DEBUG = "{{ cookiecutter.package_name | upper }}_DEBUG"  # set to 1 to see tracebacks


def uses_cuda(accelerator) -> bool:
    """Whether a run with this `trainer.accelerator` computes on an NVIDIA GPU."""
    return str(accelerator).lower() in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def supported_precision(precision) -> str:
    """`precision`, or its float16 twin ('bf16-mixed' -> '16-mixed') on a GPU without bfloat16."""
    precision = str(precision)
    if precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
        return precision.removeprefix("bf")
    return precision


def setup_hardware(trainer) -> None:
    """Check the parsed `trainer` options against the machine and adapt them, before the Trainer is built."""
    accelerator = str(trainer.accelerator).lower()
    strategy = trainer.get("strategy")
    strategy = str(getattr(strategy, "class_path", strategy)).lower()
    cuda = uses_cuda(accelerator)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available() and not torch.backends.mps.is_available():
        raise UserError(
            f"--trainer.accelerator={accelerator}, but PyTorch sees no GPU here (torch.cuda.is_available() is "
            "False): use --config configs/trainer/cpu.yaml (or --trainer.accelerator=cpu), or install the CUDA "
            "build of PyTorch (README, Install)"
        )
    if not cuda and (strategy.startswith("fsdp") or strategy.endswith("fsdpstrategy")):
        raise UserError(
            "FSDP runs on NVIDIA GPUs only (Lightning's FSDPStrategy refuses other accelerators); "
            "on this machine use configs/trainer/ddp.yaml instead of configs/trainer/fsdp.yaml"
        )
    devices = trainer.get("devices")
    several = len(devices) > 1 if isinstance(devices, (list, tuple)) else str(devices).isdigit() and int(devices) > 1
    if several and strategy.startswith("single"):
        raise UserError(
            f"--trainer.devices={devices} with --trainer.strategy={strategy}: that strategy runs one process on "
            "one device; use --config configs/trainer/ddp.yaml (one process per device), or --trainer.devices=1"
        )
    if not cuda and trainer.get("sync_batchnorm"):
        raise UserError(
            "--trainer.sync_batchnorm=true needs NVIDIA GPUs: PyTorch's SyncBatchNorm does not run on "
            "this device; leave it false here (each process then normalises with its own batch statistics)"
        )
    if cuda:
        torch.set_float32_matmul_precision("high")  # float32 matrix products on the tensor cores (TF32)
        precision = supported_precision(trainer.precision)
        if precision != str(trainer.precision):
            name = torch.cuda.get_device_name()
            rank_zero_print(f"This GPU ({name}) has no bfloat16: precision {precision}, not {trainer.precision}")
            trainer.precision = precision


def describe_run(trainer, model) -> str:
    """One line: the samples per optimizer step and how they are made, the precision and the strategy."""
    strategy = getattr(trainer.strategy, "strategy_name", None) or type(trainer.strategy).__name__
    line = (
        f"{effective_batch_size(trainer, getattr(trainer.datamodule, 'batch_size', None))}; "
        f"precision {trainer.precision}; strategy {strategy.removesuffix('Strategy').lower()}"
    )
    return line + ("; backbone compiled (torch.compile)" if model.hparams.get("compile") else "")


def model_class(model) -> type | None:
    """The class the parsed `model` (class_path and init_args) names, or None."""
    module, _, name = str(model.get("class_path", "")).rpartition(".")
    found = getattr(sys.modules.get(module), name, None)  # jsonargparse imported it while parsing
    return found if isinstance(found, type) else None


def is_text_model(model) -> bool:
    """Whether the parsed `model` is a TextClassifier."""
    from .models import TextClassifier

    return issubclass(model_class(model) or object, TextClassifier)


def prepare_text_run(config) -> None:
    """What a text model's run needs before anything is built: the `text` extra installed, the
    data's tokenizer named by the model (unless --data.tokenizer says otherwise), and under FSDP
    the encoder's transformer layer as the unit of sharding and activation checkpointing."""
    from .models.text import layer_class
    from .pretrained import encoder_skeleton, transformers

    transformers()  # one ERROR line with the install command when the extra is missing
    model, data = config.model.init_args, config.data.get("init_args")
    if data is not None and "tokenizer" in data and not data.tokenizer:
        data.tokenizer = model.model_name_or_path
    strategy = config.trainer.get("strategy")
    init = getattr(strategy, "init_args", None)
    if init is not None and str(strategy.class_path).endswith("FSDPStrategy"):
        layer = layer_class(encoder_skeleton(model.model_name_or_path))
        init.auto_wrap_policy = {layer}
        if init.get("activation_checkpointing_policy"):  # the preset's choice: [] keeps activations
            init.activation_checkpointing_policy = {layer}
        init.use_orig_params = True  # frozen and trained parameters in one FSDP unit (LoRA, frozen backbone)


class RunSummary(Callback):
    """Prints `describe_run` once (first process) when `fit` starts."""

    def on_fit_start(self, trainer, pl_module) -> None:
        rank_zero_print(describe_run(trainer, pl_module))


def newest_checkpoint(root: Path, which: str, version: str = "*") -> Path | None:
    """The most recent `last.ckpt` ('last') or other checkpoint ('best') under `root` (in run `version`)."""
    found = [
        p for p in root.glob(f"{version}/checkpoints/*.ckpt")
        if (p.stem == "last" or p.stem.startswith("last-v")) == (which == "last")
    ]  # fmt: skip
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def run_folder(checkpoint: Path) -> Path | None:
    """The run folder (logs/<name>/version_N) whose checkpoints/ holds `checkpoint`, or None."""
    run = checkpoint.parent.parent
    is_run = any((run / name).is_file() for name in ("config.yaml", "hparams.yaml"))
    return run if checkpoint.parent.name == "checkpoints" and is_run else None


class SaveRunConfig(SaveConfigCallback):
    """`fit` writes the run's `config.yaml`; `validate`, `test` and `predict` write theirs as
    `<subcommand>_config.yaml`, so an evaluation added to a run never replaces the config that trained it."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        stage = getattr(stage, "value", stage)  # a TrainerFn: 'fit', 'validate', ...
        if stage != "fit":
            self.config_filename = f"{stage}_config.yaml"
        super().setup(trainer, pl_module, stage)


@dataclass
class JoinedRun:
    """The run an evaluation of its checkpoint is logged into, and that evaluation's earlier event files."""

    folder: Path
    subcommand: str
    earlier_results: set[Path]


class CLI(LightningCLI):
    joined: JoinedRun | None = None  # when an evaluation joins a run

    def add_arguments_to_parser(self, parser) -> None:
        self.trained = None  # test/predict from a checkpoint: its model's settings (before_instantiate_classes)
        for name in ("num_classes", "input_shape", "class_names", "feature_names"):
            value = self._from_data(name)
            parser.link_arguments("data", f"model.init_args.{name}", compute_fn=value, apply_on="instantiate")
        # Callbacks every run has, with their options at the top level: --tensorboard.*, --predictions.*
        parser.add_lightning_class_args(TensorBoardViews, "tensorboard")
        parser.add_lightning_class_args(PredictionWriter, "predictions")

    def instantiate_trainer(self, **kwargs):
        # Lightning's default bar (Rich when installed) redraws on every step, which costs
        # about as much as a small model's step; this one redraws every 20 steps.
        config = self.config_init[self.subcommand].trainer
        callbacks = list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(TQDMProgressBar(refresh_rate=20))
        # Checkpoints are written to a temporary file and renamed: a kill never leaves half a file.
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        # Lightning's model summary, without the metrics' rows; Lightning then adds none of its own.
        if config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in callbacks):
            callbacks.append(LayerTable())
            kwargs["enable_model_summary"] = False
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    def _from_data(self, name: str):
        """The link's value: the data's `name`, once the data knows the checkpoint's settings (if any)."""

        def value(data):
            if self.trained is not None and hasattr(data, "use_trained"):
                data.use_trained(self.trained)  # e.g. a table's feature columns: no training file needed
            return getattr(data, name, None)

        return value

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        setup_hardware(config.trainer)
        if is_text_model(config.model):
            prepare_text_run(config)
        prepare = getattr(model_class(config.model), "prepare_run", None)
        if prepare is not None:
            prepare(config)  # what a kind of model needs before anything is built (e.g. its data's tokenizer)
        if self.subcommand == "fit" and config.get("ckpt_path") and config.model.init_args.get("init_from"):
            # A resumed fit takes every weight from its checkpoint: the model's init_from (from the
            # checkpoint's settings) is not read, and its file may be gone.
            config.model.init_args.init_from = None

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if sub and self.config[sub].get("ckpt_path"):
            self.resolve_ckpt_path(sub, self.config[sub])
        if sub and self.config[sub].get("ckpt_path"):
            # Read once here for a clear error (Lightning then reads the model settings from it).
            checkpoint = read_checkpoint(self.config[sub].ckpt_path, f"--ckpt_path={self.config[sub].ckpt_path}")
            if sub in EVALUATIONS:
                self.trained = dict(checkpoint.get("hyper_parameters") or {})
                self.join_run(sub, self.config[sub])

    def join_run(self, sub: str, config) -> None:
        """Log an evaluation of a run's checkpoint into that run (logs/<name>/version_N), as TensorBoard
        shows it: its metrics on the run's charts and in the run's HPARAMS row.

        Each evaluation writes its own event file, `events.out.tfevents.*.<subcommand>`; once it has
        finished, those of earlier evaluations of the same kind are deleted, so a run holds the metrics
        of its latest `test` (and `validate`) only. The run's config.yaml and hparams.yaml stay as `fit`
        wrote them (SaveRunConfig; Lightning writes hparams.yaml only when there is none).
        """
        logger = config.trainer.get("logger")
        init = getattr(logger, "init_args", None)
        run = run_folder(Path(config.ckpt_path))
        if run is None or init is None or not str(logger.class_path).endswith("TensorBoardLogger"):
            return  # a checkpoint from elsewhere, or another logger: the evaluation gets a folder of its own
        init.save_dir, init.name, init.version = str(run.parent.parent), run.parent.name, run.name
        init.default_hp_metric = False  # the run has its HPARAMS record and hp_metric already
        logger.dict_kwargs = {**(logger.get("dict_kwargs") or {}), "filename_suffix": f".{sub}"}
        self.joined = JoinedRun(run, sub, set(run.glob(f"events.out.tfevents.*.{sub}")))
        rank_zero_print(f"Results are added to the checkpoint's run, {run}")

    def _replace_earlier_results(self) -> None:
        if self.joined is not None and self.trainer.is_global_zero:
            for path in self.joined.earlier_results:
                path.unlink(missing_ok=True)

    # LightningCLI calls these after the subcommand has finished without an error.
    after_validate = after_test = after_predict = _replace_earlier_results

    def resolve_ckpt_path(self, sub: str, config) -> None:
        """Turn 'best'/'last' into a file of this run's logs; check that the file exists."""
        given = config.ckpt_path
        logger = config.trainer.get("logger")
        init = getattr(logger, "init_args", None)
        root = Path(init.save_dir) / (init.name or "") if init is not None and init.get("save_dir") else None
        if given in ("best", "last") and root is not None:
            version = init.get("version") if sub == "fit" else None  # given: resume that run only
            folder = "*" if version is None else f"version_{version}" if isinstance(version, int) else str(version)
            path = newest_checkpoint(root, given, folder)
            if path is None and sub == "fit":
                rank_zero_print(f"No '{given}' checkpoint under {root}: training starts from scratch.")
                config.ckpt_path = None
                return
            if path is None:
                raise UserError(
                    f"--ckpt_path={given}: no {given} checkpoint under {root}/*/checkpoints "
                    "(train first with `fit` and the same --config, or give a .ckpt path)"
                )
            if sub == "fit" and init.get("version") is None:
                init.version = path.parent.parent.name  # resume in the same log folder
            rank_zero_print(f"Using checkpoint {path}")
            config.ckpt_path = str(path)


def run(args=None, callbacks=(), parse_errors_raise: bool = False, cli_class: type = CLI) -> CLI:
    """Parse `args` (default: sys.argv), build everything and run the subcommand.

    `callbacks`: Callback objects added to the Trainer's (the hyperparameter search passes its own).
    `parse_errors_raise`: a refused option raises argparse.ArgumentError instead of printing and exiting.
    """
    quiet()
    kwargs = {"default_config_files": [str(DEFAULT_CONFIG)]} if DEFAULT_CONFIG.is_file() else {}
    if parse_errors_raise:
        kwargs["exit_on_error"] = False
    return cli_class(
        LightningModule,  # any model and data class of the project (the configs name them by class path)
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=42,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [RunSummary(), *callbacks]},  # added to the config's, never replaced
        parser_kwargs={
            **({"exit_on_error": False} if parse_errors_raise else {}),
            **{sub: kwargs for sub in SUBCOMMANDS},
        },
        args=args,
    )


class Parsed(Exception):
    """Carries the parsed config out of `ParseOnly`."""


class ParseOnly(CLI):
    """Stops once the command line is parsed and checked: nothing is built or run."""

    def before_instantiate_classes(self) -> None:
        raise Parsed(self.config[self.subcommand])


def parsed_config(args: list[str]):
    """The subcommand's config (a jsonargparse Namespace) that `args` give; a UserError if the parser refuses them."""
    import argparse

    try:
        run(args, parse_errors_raise=True, cli_class=ParseOnly)
    except Parsed as parsed:
        return parsed.args[0]
    except argparse.ArgumentError as err:
        raise UserError(f"the run config is not valid: {first_line(err)}") from None
    raise AssertionError("ParseOnly returned without a config")


def explain(err: BaseException | None) -> str | None:
    """The one-line message for a user mistake behind `err`, or None if it is a bug.

    jsonargparse re-raises errors from building the model or the data as
    `ValueError(...) from err`, so the whole `__cause__` chain is searched.
    """
    while err is not None:
        if isinstance(err, UserError):
            return str(err)
        if weights_mismatch(err):
            detail = weights_mismatch(err)
            return f"the checkpoint does not fit this model ({detail}); use one trained with the same backbone"
        err = err.__cause__
    return None


def main(args=None) -> None:
    """`run`, with user mistakes reported as one ERROR line and exit code 1."""
    try:
        run(args)
    except Exception as err:
        message = None if os.environ.get(DEBUG) else explain(err)
        if message is None:
            raise
        sys.exit(print_error(message))
