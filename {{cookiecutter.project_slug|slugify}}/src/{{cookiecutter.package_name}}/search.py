"""Hyperparameter search with Optuna (`pip install -e '.[search]'`): each trial is a `train.py fit`.

    python -m {{ cookiecutter.package_name }}.search --config configs/mnist_cnn.yaml \\
        --space configs/search/cnn.yaml --n-trials 20

The space (YAML) gives config keys ranges, e.g. `model.init_args.lr: {type: float, low: 1.0e-4,
high: 1.0e-2, log: true}`. A trial's value is its best --metric; poor trials are pruned; a failed
trial is recorded with its reason. The same command again continues the study up to --n-trials
finished trials. At the end: a table of the trials and `<output>/best.yaml` (README, "Hyperparameter search").
"""

import argparse
import difflib
import inspect
import json
import shlex
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import Callback

from .cli import explain, parsed_config, run
from .errors import UserError, first_line, print_error
from .search_report import INTERRUPTED, counted, summarize

TYPES = {"float": "FloatDistribution", "int": "IntDistribution", "categorical": "CategoricalDistribution"}


class TrialFailed(Exception):
    """A trial that could not give a value; the message is its reason."""


MINIMISED = ("loss", "rmse", "mse", "mae", "error")  # metric names a search minimises by default


class TrialMonitor(Callback):
    """Reports `metric` after each validation; stops the run when Optuna prunes it or a logged value
    (a loss) is NaN or infinite: a diverged trial gives no value."""

    def __init__(self, trial, metric: str):
        self.trial, self.metric, self.values = trial, metric, []
        self.pruned, self.failure = False, None

    def on_validation_end(self, trainer, pl_module) -> None:
        logged = trainer.callback_metrics
        if trainer.sanity_checking or self.metric not in logged:
            return
        if broken := sorted(name for name, value in logged.items() if not torch.isfinite(value).all()):
            self.failure = f"non-finite {', '.join(broken)} (NaN or inf) in epoch {trainer.current_epoch}"
        else:
            self.trial.report(float(logged[self.metric]), step=len(self.values))  # step: validations so far
            self.values.append(float(logged[self.metric]))
            self.pruned = self.trial.should_prune()
        trainer.should_stop = trainer.should_stop or self.pruned or self.failure is not None


def load_space(path: str, base: list[str]) -> dict:
    """The space file as Optuna distributions, checked: known types, their fields and the run config's keys."""
    if not Path(path).is_file():
        raise UserError(f"--space {path}: file not found (see configs/search/*.yaml for examples)")
    try:
        space = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise UserError(f"--space {path}: not valid YAML ({first_line(err)})") from None
    if not isinstance(space, dict) or not space:
        raise UserError(f"--space {path}: expected a mapping from config keys to entries such as "
                        "`type: float, low: 0.0001, high: 0.01`")  # fmt: skip
    import optuna

    distributions = {}
    for key, spec in space.items():
        where = f"--space {path}: {key}"
        if not isinstance(spec, dict) or spec.get("type") not in TYPES:
            raise UserError(f"{where}: give a mapping with type: float, int or categorical, not {spec!r}")
        kind = getattr(optuna.distributions, TYPES[spec["type"]])
        fields = {k: v for k, v in spec.items() if k != "type"}
        takes = inspect.signature(kind).parameters
        if missing := [name for name, p in takes.items() if p.default is p.empty and name not in fields]:
            raise UserError(f"{where}: type {spec['type']} needs {', '.join(missing)}")
        try:  # Optuna checks the values: low <= high, log needs low > 0, ...
            distributions[key] = kind(**fields)
        except (TypeError, ValueError) as err:
            raise UserError(f"{where}: {first_line(err)} (type {spec['type']} takes {', '.join(takes)})") from None
    keys = set(parsed_config(["fit", *base]).keys())  # the run config's keys, dotted: model.init_args.lr, ...
    for key in space:
        head, _, rest = key.partition(".")
        if key not in keys and f"{head}.init_args.{rest}" not in keys:  # jsonargparse takes model.lr too
            near = difflib.get_close_matches(key, sorted(keys), n=3)
            hint = f"did you mean {' or '.join(near)}? " if near else ""
            raise UserError(f"--space {path}: unknown key '{key}': not an option of the run config; {hint}"
                            "`python train.py fit --config <your config> --print_config` shows every key")  # fmt: skip
    return distributions


def objective(trial, base: list[str], output: Path, metric: str, direction: str) -> float:
    """Train one trial in this process; its value, or TrialFailed / optuna.TrialPruned."""
    import optuna

    args = ["fit", *base, *(f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in trial.params.items())]
    args += [
        f"--trainer.logger.init_args.save_dir={output}",
        f"--trainer.logger.init_args.name=trial_{trial.number:03d}",
    ]
    command = shlex.join(["python", "train.py", *args])
    trial.set_user_attr("command", command)
    print(f"\nTrial {trial.number}: {command}", flush=True)
    monitor = TrialMonitor(trial, metric)
    try:
        cli = run(args, callbacks=[monitor], parse_errors_raise=True)
        trial.set_user_attr("log_dir", str(cli.trainer.log_dir))
    except SystemExit:  # Lightning turns Ctrl-C during fit into exit(1), and ignores SIGINT from then on
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt from None
    except argparse.ArgumentError as err:  # the parser refused a sampled value
        raise TrialFailed(f"the command line refused the options: {refusal(err)}") from None
    except Exception as err:  # a bug in a trial must not end the study: record it, go on
        if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower():
            raise TrialFailed(f"out of memory ({first_line(err)})") from None
        raise TrialFailed(explain(err) or f"{type(err).__name__}: {first_line(err)}") from None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if monitor.failure:
        raise TrialFailed(monitor.failure)
    if monitor.pruned:
        raise optuna.TrialPruned(f"{metric} {monitor.values[-1]:.4g} after {len(monitor.values)} validations")
    if not monitor.values:
        raise TrialFailed(f"no {metric} was logged (choose --metric from the names the run logs, e.g. val/acc)")
    return max(monitor.values) if direction == "maximize" else min(monitor.values)


def refusal(err: argparse.ArgumentError) -> str:
    """The innermost key and what it got, e.g. 'Parser key "scheduler": Expected a ... Got value: bogus'."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    keys = [line for line in lines if line.startswith("Parser key")]
    detail = next((line for line in lines if "Got value" in line), "")
    return first_line(" ".join(filter(None, [keys[-1] if keys else lines[0] if lines else "", detail])))


def optimize(study, n_trials: int, space: dict, **kwargs) -> None:
    import optuna
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # left by a killed search
        study.set_user_attr(f"reason of trial {trial.number}", f"{INTERRUPTED} (the search stopped)")
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params)  # its values are tried again, first
        print(f"Trial {trial.number} was interrupted by an earlier search: recorded as failed; its values run again")
    while sum(counted(study, t) for t in study.get_trials(deepcopy=False)) < n_trials:
        trial, started = study.ask(space), time.perf_counter()
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
    parser.add_argument("--direction", choices=("maximize", "minimize"), default=None,
                        help="default: from --metric (minimize loss, rmse, mae, ...; maximize the rest)")  # fmt: skip
    parser.add_argument("--pruner", choices=("median", "none"), default="median", help="stop poor trials early")
    parser.add_argument("--seed", type=int, default=42, help="the sampler's seed")
    parser.add_argument("--summary", action="store_true", help="print the table and write best.yaml; no trials")
    args, passed = parser.parse_known_args(argv)
    if any(not a.startswith("--") for a in passed[:1]):
        parser.error(f"unexpected argument {passed[0]}")
    if not args.summary and (not args.config or not args.space):
        parser.error("--config and --space are needed (or --summary to show an existing study)")
    args.direction = args.direction or direction_of(args.metric)
    return args, passed


def direction_of(metric: str) -> str:
    """'minimize' for a loss or an error (val/loss, val/rmse, val/mae), 'maximize' for a score (val/acc, val/r2)."""
    name = metric.rsplit("/", 1)[-1].lower()
    return "minimize" if name.startswith(MINIMISED) or name.endswith(MINIMISED) else "maximize"


def search(args, passed: list[str]) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Trials get their args from here, not from this command's: Lightning's warning about both is moot.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    storage = args.storage or f"sqlite:///{output / 'search.db'}"
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if args.summary:
        names = optuna.get_all_study_names(storage)
        if args.study_name not in names:
            raise UserError(f"no study '{args.study_name}' in {storage} (it holds: {names or 'none'})")
        return summarize(optuna.load_study(study_name=args.study_name, storage=storage), output, args.metric)
    base = [item for config in args.config for item in ("--config", config)] + passed
    space = load_space(args.space, base)
    study = optuna.create_study(storage=storage, study_name=args.study_name, direction=args.direction,
                                load_if_exists=True)  # fmt: skip
    if (direction := study.direction.name.lower()) != args.direction:
        raise UserError(f"study '{args.study_name}' was created to {direction}, not {args.direction}")
    # Seeded by the trials so far, so that a resumed search does not draw its first trials' values again.
    study.sampler = optuna.samplers.TPESampler(seed=args.seed + len(study.trials))
    median = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    study.pruner = median if args.pruner == "median" else optuna.pruners.NopPruner()
    done = sum(counted(study, t) for t in study.trials)
    print(f"Study '{args.study_name}' in {storage}: {done} finished trials, {max(0, args.n_trials - done)} to run")
    started = time.perf_counter()
    try:
        optimize(study, args.n_trials, space=space, base=base, output=output, metric=args.metric,
                 direction=args.direction)  # fmt: skip
    finally:
        summarize(study, output, args.metric)
        print(f"Wall time {time.perf_counter() - started:.0f} s")


def main(argv=None) -> None:
    args, passed = parse(argv)
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise SystemExit(print_error("optuna is not installed: pip install -e '.[search]'")) from None
    try:
        search(args, passed)
    except UserError as err:
        raise SystemExit(print_error(err)) from None
    except KeyboardInterrupt:
        print("Interrupted: run the same command again to continue the study", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
