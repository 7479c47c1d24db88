"""What a search leaves: the table of its trials and `<output>/best.yaml`, the best trial's whole
config (search.py prints them at the end, and with --summary for a study already run)."""

from pathlib import Path

import yaml

INTERRUPTED = "interrupted"  # the start of the reason of a trial cut off by Ctrl-C or a killed search


def reason(study, trial) -> str:
    """Why a trial failed: its own record, or the study's for a trial a killed search left running."""
    return str(trial.user_attrs.get("reason") or study.user_attrs.get(f"reason of trial {trial.number}", ""))


def counted(study, trial) -> bool:
    """Trials that count towards --n-trials: finished ones, except those cut off by an interruption."""
    return trial.state.is_finished() and not reason(study, trial).startswith(INTERRUPTED)


def short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summarize(study, output: Path, metric: str) -> None:
    """Print the trials as a table; write `<output>/best.yaml`, the best trial's whole config as it ran."""
    rows = [("#", "state", "value", "seconds", "params", "reason")]
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if counted(study, t) else None
        params = " ".join(f"{key.rsplit('.', 1)[-1]}={short(v)}" for key, v in t.params.items())
        value = "" if t.value is None else f"{t.value:.4f}"
        rows.append((str(t.number), t.state.name.lower(), value, "" if seconds is None else f"{seconds:.0f}", params,
                     reason(study, t)))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[5]).rstrip() for row in rows]
    print(f"\nStudy '{study.study_name}': {len(study.trials)} trials\n" + "\n".join(lines))
    if not any(t.state.name == "COMPLETE" for t in study.trials):
        return print("No trial has completed yet: no best.yaml")
    best = study.best_trial
    source = Path(best.user_attrs.get("log_dir", "")) / "config.yaml"
    if not source.is_file():
        return print(f"{source}: not found (the best trial's logs were moved?): no best.yaml")
    config = yaml.safe_load(source.read_text())
    logger = (config.get("trainer") or {}).get("logger")
    if isinstance(logger, dict) and isinstance(logger.get("init_args"), dict):
        logger["init_args"].update(save_dir="logs", name=f"{study.study_name}-best", version=None)
    target = output / "best.yaml"
    params = ", ".join(f"{key}={short(v)}" for key, v in best.params.items())
    header = (f"# Best trial {best.number} of study '{study.study_name}': {metric} {best.value:.4f}\n"
              f"# with {params}.\n# Train it: python train.py fit --config {target}\n")  # fmt: skip
    target.write_text(header + yaml.safe_dump(config, sort_keys=False))
    print(f"Best: trial {best.number}, {metric} {best.value:.4f}; {best.user_attrs.get('command', '')}")
    print(f"Its whole config: {target}; train it with: python train.py fit --config {target}")
