"""Hyperparameter search with Optuna: each trial is an ordinary `train.py fit` with sampled options.

    python -m {{ cookiecutter.package_name }}.search --config configs/mnist_cnn.yaml --space configs/search/cnn.yaml \\
        --n-trials 20 --storage sqlite:///runs/search.db --study-name cnn --output runs/search-cnn
    python -m {{ cookiecutter.package_name }}.search --summary --storage sqlite:///runs/search.db --study-name cnn \\
        --output runs/search-cnn

Needs the `search` extra: pip install -e '.[search]'.

- The space is a YAML file: one entry per config key, e.g.
      model.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      model.init_args.width: {type: int, low: 16, high: 64, step: 16}
      data.init_args.batch_size: {type: categorical, choices: [64, 128, 256]}
  Keys are checked against the run config (`train.py fit --config ... --print_config` lists them).
- Every trial prints its command (`python train.py fit ...`), which trains the same run again.
  Options after the known ones (e.g. --trainer.max_epochs=3) go to every trial.
- The trial's value is the best `--metric` (default val/acc) over its validation epochs. A poor
  trial is stopped early (pruned) from its validation values (Optuna's median rule). A trial that
  raises, runs out of memory or whose training loss becomes NaN is recorded as failed, with its
  reason, and the search goes on.
- The study lives in `--storage` (an SQLite file): the same command again continues it until it
  holds `--n-trials` finished trials; raise --n-trials to add more. A trial cut off by an
  interruption is recorded as failed ('interrupted') and its values are tried again first.
  One search process per study.
- Each trial logs to `<output>/trial_NNN/version_0` (TensorBoard: `tensorboard --logdir <output>`;
  the HPARAMS tab compares the trials). At the end a table of the trials is printed and
  `<output>/best.yaml` written: the best trial's whole config, for `train.py fit --config`.
"""

import argparse
import contextlib
import difflib
import functools
import gc
import io
import json
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import Callback

from .cli import explain, run
from .errors import UserError, first_line

TYPES = {
    "float": ({"type", "low", "high"}, {"log", "step"}),
    "int": ({"type", "low", "high"}, {"log", "step"}),
    "categorical": ({"type", "choices"}, set()),
}
INTERRUPTED = "interrupted"


class TrialFailed(Exception):
    """A trial that could not give a value; the message is its reason."""


class TrialMonitor(Callback):
    """Reports `metric` to the trial after each validation; stops the run when Optuna prunes it
    or when the training loss is not finite."""

    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric
        self.values: list[float] = []
        self.pruned = False
        self.failure: str | None = None
        self.finite = None  # whether every training loss so far was finite, kept on the device (no sync)
        self.started = False

    def setup(self, trainer, pl_module, stage) -> None:
        self.started = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            finite = torch.isfinite(loss.detach()).all()
            self.finite = finite if self.finite is None else self.finite & finite

    def check_loss(self, trainer) -> bool:
        if self.finite is not None and not bool(self.finite):
            self.failure = f"non-finite training loss (NaN or inf) in epoch {trainer.current_epoch}"
            trainer.should_stop = True
        return self.failure is None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.check_loss(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self.check_loss(trainer) or self.metric not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.metric])
        if not math.isfinite(value):
            self.failure = f"{self.metric} is {value}"
            trainer.should_stop = True
            return
        self.trial.report(value, step=len(self.values))  # step: validations so far
        self.values.append(value)
        if self.trial.should_prune():
            self.pruned = True
            trainer.should_stop = True


@contextlib.contextmanager
def own_argv():
    """The CLI is given its args: hide this command's own from it (LightningCLI warns about both)."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        yield
    finally:
        sys.argv = argv


class Tee(io.TextIOBase):
    """Writes to a stream and keeps the last characters written (for a trial's error message)."""

    def __init__(self, stream):
        self.stream, self.tail = stream, ""

    def write(self, text: str) -> int:
        self.tail = (self.tail + text)[-4000:]
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


# ---------------------------------------------------------------------------------------------- the space


def load_space(path: str) -> dict[str, dict]:
    """Read and check the space file: known types and their fields."""
    if not Path(path).is_file():
        raise UserError(f"--space {path}: file not found (see configs/search/*.yaml for examples)")
    try:
        space = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise UserError(f"--space {path}: not valid YAML ({first_line(err)})") from None
    if not isinstance(space, dict) or not space:
        raise UserError(
            f"--space {path}: expected a mapping from config keys to entries such as "
            "`type: float, low: 0.0001, high: 0.01`"
        )
    for key, spec in space.items():
        where = f"--space {path}: {key}"
        if not isinstance(spec, dict) or spec.get("type") not in TYPES:
            raise UserError(f"{where}: give a mapping with type: float, int or categorical, not {spec!r}")
        needed, optional = TYPES[spec["type"]]
        if needed - spec.keys():
            raise UserError(f"{where}: type {spec['type']} needs {', '.join(sorted(needed - spec.keys()))}")
        if spec.keys() - needed - optional:
            extra = ", ".join(sorted(spec.keys() - needed - optional))
            raise UserError(f"{where}: unknown field {extra} (type {spec['type']} takes {sorted(needed | optional)})")
        if spec["type"] == "categorical":
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise UserError(f"{where}: choices must be a non-empty list")
        elif not all(isinstance(spec[b], (int, float)) for b in ("low", "high")) or spec["low"] > spec["high"]:
            raise UserError(f"{where}: low and high must be numbers with low <= high")
        elif spec.get("log") and (spec["low"] <= 0 or spec.get("step") not in (None, 1)):
            raise UserError(f"{where}: log: true needs low > 0 and no step")
    return space


def check_keys(space: dict, path: str, valid: set[str]) -> None:
    """Every key of the space must be an option of the run config."""
    for key in space:
        if key not in valid and shorthand(key) not in valid:
            near = difflib.get_close_matches(key, sorted(valid), n=3)
            hint = f"did you mean {' or '.join(near)}? " if near else ""
            raise UserError(
                f"--space {path}: unknown key '{key}': not an option of the run config; {hint}"
                "`python train.py fit --config <your config> --print_config` shows every key"
            )


def shorthand(key: str) -> str:
    """'model.lr' -> 'model.init_args.lr' (jsonargparse accepts both)."""
    head, _, rest = key.partition(".")
    return f"{head}.init_args.{rest}"


@functools.lru_cache(maxsize=8)
def config_keys_in(base: tuple[str, ...], cwd: str) -> frozenset[str]:
    return frozenset(config_keys(list(base)))


def config_keys(base: list[str]) -> set[str]:
    """Every key of the run config (`fit --print_config`), dotted: 'model.init_args.lr', ..."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), own_argv():
            run(["fit", *base, "--print_config"])
    except SystemExit as exit:
        if exit.code:
            lines = [line for line in err.getvalue().splitlines() if line.strip()]
            raise UserError(f"the run config is not valid: {lines[-1] if lines else exit.code}") from None

    keys = set()

    def walk(node, prefix: str) -> None:
        for name, value in node.items():
            keys.add(prefix + name)
            if isinstance(value, dict):
                walk(value, f"{prefix}{name}.")

    walk(yaml.safe_load(out.getvalue()) or {}, "")
    return keys


def suggest(trial, key: str, spec: dict):
    if spec["type"] == "categorical":
        return trial.suggest_categorical(key, spec["choices"])
    kind = trial.suggest_float if spec["type"] == "float" else trial.suggest_int
    options = {name: spec[name] for name in ("log", "step") if spec.get(name) is not None}
    return kind(key, spec["low"], spec["high"], **options)


# ---------------------------------------------------------------------------------------------- trials


def objective(trial, space: dict, base: list[str], output: Path, metric: str, direction: str) -> float:
    """Train one trial in this process; its value, or TrialFailed / optuna.TrialPruned."""
    import optuna

    params = {key: suggest(trial, key, spec) for key, spec in space.items()}
    args = [
        "fit",
        *base,
        *(f"--{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in params.items()),
        f"--trainer.logger.init_args.save_dir={output}",
        f"--trainer.logger.init_args.name=trial_{trial.number:03d}",
    ]
    command = shlex.join(["python", "train.py", *args])
    trial.set_user_attr("command", command)
    print(f"\nTrial {trial.number}: {command}", flush=True)
    monitor = TrialMonitor(trial, metric)
    stderr = Tee(sys.stderr)
    cli = None
    try:
        with contextlib.redirect_stderr(stderr), own_argv():
            cli = run(args, callbacks=[monitor])
        trial.set_user_attr("log_dir", str(cli.trainer.log_dir))
    except SystemExit as exit:
        if monitor.started:  # Lightning turns Ctrl-C during fit into exit(1), and ignores SIGINT from then on
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt from None
        # The parser refused a sampled value; it printed why.
        raise TrialFailed(f"the command line refused the options: {parser_error(stderr.tail, exit.code)}") from None
    except torch.cuda.OutOfMemoryError as err:
        raise TrialFailed(f"out of memory ({first_line(err)})") from None
    except (optuna.TrialPruned, KeyboardInterrupt):
        raise
    except Exception as err:  # a bug in a trial must not end the study: record it, go on
        reason = explain(err) or f"{type(err).__name__}: {first_line(err)}"
        if "out of memory" in str(err).lower():
            reason = f"out of memory ({first_line(err)})"
        raise TrialFailed(reason) from None
    finally:
        del cli
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if monitor.failure:
        raise TrialFailed(monitor.failure)
    if monitor.pruned:
        raise optuna.TrialPruned(f"{metric} {monitor.values[-1]:.4g} after {len(monitor.values)} validations")
    if not monitor.values:
        raise TrialFailed(f"no {metric} was logged (choose --metric from the names the run logs, e.g. val/acc)")
    return max(monitor.values) if direction == "maximize" else min(monitor.values)


def parser_error(text: str, code) -> str:
    """The gist of jsonargparse's message: the innermost key and what it got, e.g.
    'Parser key "scheduler": Expected a typing.Literal['cosine', 'constant']. Got value: bogus'."""
    lines = [line.strip() for line in text.rsplit("error:", 1)[-1].splitlines() if line.strip()]
    keys = [line for line in lines if line.startswith("Parser key")]
    detail = next((line for line in lines if "Got value" in line), "")
    return first_line(" ".join(filter(None, [keys[-1] if keys else (lines[0] if lines else f"exit {code}"), detail])))


def counted(trial) -> bool:
    """Trials that count towards --n-trials: finished ones, except those cut off by an interruption."""
    from optuna.trial import TrialState

    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return trial.state in finished and not str(trial.user_attrs.get("reason", "")).startswith(INTERRUPTED)


def fail_interrupted(study) -> None:
    """Trials left running by a search that was killed: record them as failed ('interrupted')."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, "reason", f"{INTERRUPTED} (the search stopped)")
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        study.enqueue_trial(trial.params)  # its values are tried again, first
        print(f"Trial {trial.number} was interrupted by an earlier search: recorded as failed; its values run again")


def optimize(study, n_trials: int, **kwargs) -> None:
    import optuna
    from optuna.trial import TrialState

    while sum(map(counted, study.get_trials(deepcopy=False))) < n_trials:
        trial = study.ask()
        started = time.perf_counter()
        try:
            value = objective(trial, **kwargs)
        except optuna.TrialPruned as pruned:
            study.tell(trial, state=TrialState.PRUNED)
            print(f"Trial {trial.number} pruned: {pruned} ({time.perf_counter() - started:.0f} s)", flush=True)
        except TrialFailed as failed:
            trial.set_user_attr("reason", str(failed))
            study.tell(trial, state=TrialState.FAIL)
            print(f"Trial {trial.number} failed: {failed}", flush=True)
        except KeyboardInterrupt:
            trial.set_user_attr("reason", f"{INTERRUPTED} (Ctrl-C)")
            study.tell(trial, state=TrialState.FAIL)
            study.enqueue_trial(trial.params)  # the next search tries its values first
            raise
        else:
            study.tell(trial, value)
            print(f"Trial {trial.number}: {kwargs['metric']} {value:.4f} ({time.perf_counter() - started:.0f} s)")


# ---------------------------------------------------------------------------------------------- results


def short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table(study) -> str:
    """The trials as a text table: number, state, value, duration, params, reason."""
    rows = [("#", "state", "value", "seconds", "params", "reason")]
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        if not counted(t):  # running, or cut off: its end is when a later search found it
            seconds = None
        rows.append(
            (
                str(t.number),
                t.state.name.lower(),
                "" if t.value is None else f"{t.value:.4f}",
                "" if seconds is None else f"{seconds:.0f}",
                " ".join(f"{key.rsplit('.', 1)[-1]}={short(v)}" for key, v in t.params.items()),
                str(t.user_attrs.get("reason", "")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join(("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[5]).rstrip() for row in rows)


def write_best(study, output: Path, metric: str) -> Path | None:
    """`<output>/best.yaml`: the best trial's whole config (as it ran), logging to logs/<study>-best."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        print("No trial has completed yet: no best.yaml")
        return None
    best = study.best_trial
    source = Path(best.user_attrs.get("log_dir", "")) / "config.yaml"
    if not source.is_file():
        print(f"{source}: not found (the best trial's logs were moved?): no best.yaml")
        return None
    config = yaml.safe_load(source.read_text())
    logger = (config.get("trainer") or {}).get("logger")
    if isinstance(logger, dict) and isinstance(logger.get("init_args"), dict):
        logger["init_args"].update(save_dir="logs", name=f"{study.study_name}-best", version=None)
    target = output / "best.yaml"
    params = ", ".join(f"{key}={short(v)}" for key, v in best.params.items())
    header = (
        f"# Best trial {best.number} of study '{study.study_name}': {metric} {best.value:.4f}\n"
        f"# with {params}.\n# Train it: python train.py fit --config {target}\n"
    )
    target.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return target


def summarize(study, output: Path, metric: str) -> None:
    print(f"\nStudy '{study.study_name}': {len(study.trials)} trials\n{table(study)}")
    path = write_best(study, output, metric)
    if path is not None:
        best = study.best_trial
        print(f"Best: trial {best.number}, {metric} {best.value:.4f}; {best.user_attrs.get('command', '')}")
        print(f"Its whole config: {path}; train it with: python train.py fit --config {path}")


# ---------------------------------------------------------------------------------------------- main


def parse(argv):
    parser = argparse.ArgumentParser(
        prog="python -m {{ cookiecutter.package_name }}.search",
        description="Hyperparameter search: each trial is `train.py fit` with sampled options. Options not "
        "listed here (e.g. --trainer.max_epochs=3) are passed on to every trial.",
    )
    parser.add_argument("--config", action="append", default=[], help="run config(s), as for train.py")
    parser.add_argument("--space", help="the search space (YAML), e.g. configs/search/cnn.yaml")
    parser.add_argument("--n-trials", type=int, default=20, help="finished trials the study should hold (total)")
    parser.add_argument("--storage", default=None, help="Optuna storage (default sqlite:///<output>/search.db)")
    parser.add_argument("--study-name", default="search")
    parser.add_argument("--output", default="runs/search", help="trials' logs and best.yaml go here")
    parser.add_argument("--metric", default="val/acc", help="the logged value to optimise")
    parser.add_argument("--direction", choices=("maximize", "minimize"), default="maximize")
    parser.add_argument("--pruner", choices=("median", "none"), default="median", help="stop poor trials early")
    parser.add_argument("--seed", type=int, default=42, help="the sampler's seed")
    parser.add_argument("--summary", action="store_true", help="print the table and write best.yaml; no trials")
    args, passed = parser.parse_known_args(argv)
    if any(not a.startswith("--") for a in passed[:1]):
        parser.error(f"unexpected argument {passed[0]}")
    if not args.summary and (not args.config or not args.space):
        parser.error("--config and --space are needed (or --summary to show an existing study)")
    return args, passed


def search(args, passed: list[str]) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    storage = args.storage or f"sqlite:///{output / 'search.db'}"
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if args.summary:
        try:
            study = optuna.load_study(study_name=args.study_name, storage=storage)
        except KeyError:
            names = optuna.get_all_study_names(storage)
            raise UserError(f"no study '{args.study_name}' in {storage} (it holds: {names or 'none'})") from None
        summarize(study, output, args.metric)
        return
    base = [item for config in args.config for item in ("--config", config)] + passed
    space = load_space(args.space)
    check_keys(space, args.space, config_keys_in(tuple(base), os.getcwd()))  # cached: tests search often
    study = optuna.create_study(
        storage=storage, study_name=args.study_name, direction=args.direction, load_if_exists=True
    )
    if study.direction.name.lower() != args.direction:
        created = study.direction.name.lower()
        raise UserError(f"study '{args.study_name}' was created to {created}, not {args.direction}")
    fail_interrupted(study)
    done = sum(map(counted, study.trials))
    # Seeded by the trials so far, so that a resumed search does not draw its first trials' values again.
    study.sampler = optuna.samplers.TPESampler(seed=args.seed + len(study.trials))
    study.pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
        if args.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    print(f"Study '{args.study_name}' in {storage}: {done} finished trials, {max(0, args.n_trials - done)} to run")
    started = time.perf_counter()
    kwargs = {"space": space, "base": base, "output": output, "metric": args.metric, "direction": args.direction}
    try:
        optimize(study, args.n_trials, **kwargs)
    finally:
        summarize(study, output, args.metric)
        print(f"Wall time {time.perf_counter() - started:.0f} s")


def main(argv=None) -> None:
    args, passed = parse(argv)
    try:
        import optuna  # noqa: F401
    except ImportError:
        print("ERROR: optuna is not installed: pip install -e '.[search]'", file=sys.stderr)
        sys.exit(1)
    try:
        search(args, passed)
    except UserError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("Interrupted: run the same command again to continue the study", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
