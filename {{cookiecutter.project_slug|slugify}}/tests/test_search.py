"""The hyperparameter search (`python -m <package>.search`): trials, resuming, failures, best.yaml."""

import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, SMALL
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from {{ cookiecutter.package_name }} import search, search_report
from {{ cookiecutter.package_name }}.cli import run

optuna = pytest.importorskip("optuna", reason="the search needs the `search` extra: pip install -e '.[search]'")

# Tiny MLPs for one epoch of a few batches: a trial takes about a second.
TRIAL = ["--config", str(ROOT / "configs" / "mnist_mlp.yaml"), *SMALL,
         "--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2"]  # fmt: skip
SPACE = """\
model.init_args.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
model.init_args.width: {type: int, low: 8, high: 32, step: 8}
data.init_args.batch_size: {type: categorical, choices: [16, 32]}
"""


def searching(space, *extra: str, n: int = 3, study: str = "tiny") -> list[str]:
    return ["--space", str(space), "--n-trials", str(n), "--study-name", study, "--output", "runs/tiny",
            "--storage", "sqlite:///runs/tiny.db", *TRIAL, *extra]  # fmt: skip


def load(study: str = "tiny"):
    return optuna.load_study(study_name=study, storage="sqlite:///runs/tiny.db")


@pytest.fixture
def space(workdir):
    (workdir / "runs").mkdir()
    path = workdir / "space.yaml"
    path.write_text(SPACE)
    return path


def test_search_writes_a_trainable_best_config(space, capsys):
    search.main(searching(space, n=3))
    out = capsys.readouterr().out
    study = load()
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert len({tuple(t.params.items()) for t in trials}) == 3
    for t in trials:
        assert 0.0 <= t.value <= 1.0
        assert set(t.params) == {"model.init_args.lr", "model.init_args.width", "data.init_args.batch_size"}
        # Each trial's command is printed, with its sampled values, and names the trial's log folder.
        assert f"Trial {t.number}: {t.user_attrs['command']}" in out
        assert f"--model.init_args.lr={t.params['model.init_args.lr']!r}" in t.user_attrs["command"]
        log_dir = Path(t.user_attrs["log_dir"])
        assert log_dir.parent.name == f"trial_{t.number:03d}" and log_dir.parent.parent.name == "tiny"
        saved = yaml.safe_load((log_dir / "config.yaml").read_text())
        assert saved["model"]["init_args"]["width"] == t.params["model.init_args.width"]
        # The HPARAMS tab's data: the hyperparameters and hp_metric in the trial's events file.
        events = b"".join(p.read_bytes() for p in log_dir.glob("events.out.tfevents.*"))
        assert b"_hparams_/session_start_info" in events and b"hp_metric" in events
    # The table: one row per trial, with its state and value.
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:1].isdigit() and "complete" in line}
    assert sorted(rows) == ["0", "1", "2"]
    assert all(float(rows[str(t.number)][2]) == pytest.approx(t.value, abs=1e-4) for t in trials)

    best = study.best_trial
    assert best.value == max(t.value for t in trials)
    config = yaml.safe_load(open("runs/tiny/best.yaml"))
    assert config["model"]["init_args"]["lr"] == best.params["model.init_args.lr"]
    assert config["data"]["init_args"]["batch_size"] == best.params["data.init_args.batch_size"]
    assert config["trainer"]["logger"]["init_args"]["name"] == "tiny-best"
    cli = run(["fit", "--config", "runs/tiny/best.yaml", "--trainer.fast_dev_run=true", *SMALL])
    assert cli.model.hparams.width == best.params["model.init_args.width"]
    assert cli.datamodule.batch_size == best.params["data.init_args.batch_size"]
    # best.yaml's callbacks replace the default config's list: none of them twice.
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert "ModelCheckpoint" in names and len(names) == len(set(names))


def test_failures_are_recorded_and_a_resumed_search_adds_trials(space, monkeypatch, capsys):
    failures = [RuntimeError("boom in trial"), torch.cuda.OutOfMemoryError("CUDA out of memory. Tried 2.00 GiB")]

    def flaky(args, callbacks=(), **kwargs):
        if callbacks and len(failures) in (2, 1) and not getattr(flaky, "ok", False):
            flaky.ok = True  # fail, succeed, fail
            raise failures.pop(0)
        flaky.ok = False
        return run(args, callbacks=callbacks, **kwargs)

    # A search killed during a trial leaves it RUNNING: the next search records it as interrupted.
    optuna.create_study(study_name="tiny", storage="sqlite:///runs/tiny.db", direction="maximize").ask()
    monkeypatch.setattr(search, "run", flaky)
    search.main(searching(space, n=2))
    out = capsys.readouterr().out
    assert [t.state.name for t in load().trials] == ["FAIL", "FAIL", "COMPLETE"]
    assert "Trial 0 was interrupted" in out and "Trial 1 failed: RuntimeError: boom in trial" in out
    # The same command again: the study holds its 2 trials, nothing runs; a larger --n-trials adds to it.
    search.main(searching(space, n=2))
    assert len(load().trials) == 3
    search.main(searching(space, n=3))
    trials = load().trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "COMPLETE", "FAIL"]
    reasons = [search_report.reason(load(), t) for t in trials]
    assert reasons[0].startswith("interrupted") and reasons[2] == ""
    assert reasons[1] == "RuntimeError: boom in trial" and reasons[3].startswith("out of memory")
    assert trials[1].params != trials[3].params  # a resumed search does not draw the same values again

    # --summary: the table of the stored study, reasons included, without running anything.
    capsys.readouterr()
    search.main(["--summary", "--study-name", "tiny", "--storage", "sqlite:///runs/tiny.db", "--output", "runs/tiny"])
    out = capsys.readouterr().out
    assert "Study 'tiny': 4 trials" in out and "Trial 2:" not in out
    row = [line for line in out.splitlines() if line.startswith("1 ")][0]
    assert row.split()[1] == "fail" and row.endswith("RuntimeError: boom in trial")
    assert f"Best: trial 2, val/acc {trials[2].value:.4f}" in out
    assert len(load().trials) == 4


def test_ctrl_c_ends_the_search_and_the_same_command_runs_the_trial_again(space, monkeypatch, capsys):
    def interrupted(args, callbacks=(), **kwargs):
        raise SystemExit(1)  # what Lightning does on Ctrl-C during fit

    monkeypatch.setattr(search, "run", interrupted)
    with pytest.raises(SystemExit) as exit:
        search.main(searching(space, n=1))
    assert exit.value.code == 130
    assert "run the same command again to continue the study" in capsys.readouterr().err
    [trial, waiting] = load().trials
    assert trial.state.name == "FAIL" and trial.user_attrs["reason"] == "interrupted (Ctrl-C)"
    assert waiting.state.name == "WAITING"
    assert not search_report.counted(load(), trial)
    monkeypatch.setattr(search, "run", run)
    search.main(searching(space, n=1))
    again = load().trials[1]  # the same values, run to the end this time
    assert again.state.name == "COMPLETE" and again.params == trial.params


def test_nan_loss_fails_the_trial(workdir):
    (workdir / "runs").mkdir()
    (workdir / "space.yaml").write_text("model.init_args.lr: {type: categorical, choices: [1.0e+30]}\n")
    search.main(searching(workdir / "space.yaml", "--model.init_args.scheduler=constant", n=1, study="nan"))
    [trial] = load("nan").trials
    assert trial.state.name == "FAIL"
    assert trial.user_attrs["reason"].startswith("non-finite ") and "val/loss" in trial.user_attrs["reason"]
    assert trial.user_attrs["reason"].endswith("(NaN or inf) in epoch 0")


def test_a_value_the_command_line_refuses_fails_the_trial(workdir):
    (workdir / "runs").mkdir()
    (workdir / "space.yaml").write_text("model.init_args.scheduler: {type: categorical, choices: [bogus]}\n")
    search.main(searching(workdir / "space.yaml", n=1, study="refused"))
    [trial] = load("refused").trials
    assert trial.state.name == "FAIL"
    assert trial.user_attrs["reason"].startswith('the command line refused the options: Parser key "scheduler"')
    assert "Got value: bogus" in trial.user_attrs["reason"]


def test_a_poor_trial_is_pruned(space, monkeypatch):
    class Always(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    monkeypatch.setattr(optuna.pruners, "MedianPruner", lambda **kwargs: Always())
    search.main(searching(space, "--trainer.max_epochs=2", n=1, study="pruned"))
    [trial] = load("pruned").trials
    assert trial.state.name == "PRUNED"
    assert list(trial.intermediate_values) == [0]  # stopped after its first validation, not after 2


def test_pruner_none_lets_every_trial_finish(space, monkeypatch):
    """The same always-pruning stand-in as above: with --pruner none it is never consulted."""

    class Always(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    monkeypatch.setattr(optuna.pruners, "MedianPruner", lambda **kwargs: Always())
    search.main(searching(space, "--trainer.max_epochs=2", "--pruner", "none", n=1, study="unpruned"))
    [trial] = load("unpruned").trials
    assert trial.state.name == "COMPLETE"
    assert list(trial.intermediate_values) == [0, 1]  # both validations


def test_metric_and_direction_choose_what_is_optimised(space):
    search.main(searching(space, "--trainer.max_epochs=2", "--metric", "val/loss", "--direction", "minimize",
                          n=2, study="loss"))  # fmt: skip
    study = load("loss")
    assert study.direction.name == "MINIMIZE"
    for t in study.trials:
        # The values reported are the run's logged val/loss, and the trial's value is their minimum.
        events = EventAccumulator(t.user_attrs["log_dir"], size_guidance={"scalars": 0})
        events.Reload()
        logged = [e.value for e in events.Scalars("val/loss")]
        assert list(t.intermediate_values.values()) == pytest.approx(logged) and len(logged) == 2
        assert logged[0] != logged[1] and t.value == pytest.approx(min(logged))
    assert study.best_trial.value == min(t.value for t in study.trials)


def test_direction_follows_the_metric():
    """Without --direction: a loss or an error (RMSE of a regression) is minimised, a score maximised."""
    assert [search.direction_of(m) for m in ("val/rmse", "val/mae", "val/loss", "train/loss_epoch")] == ["minimize"] * 4
    assert [search.direction_of(m) for m in ("val/acc", "val/f1", "val/r2")] == ["maximize"] * 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model.init_args.lrr: {type: float, low: 0.001, high: 0.01}\n",
         "unknown key 'model.init_args.lrr': not an option of the run config; did you mean model.init_args.lr"),
        ("model.init_args.lr: {type: uniform, low: 0.001, high: 0.01}\n", "type: float, int or categorical"),
        ("model.init_args.lr: {type: float, low: 0.001}\n", "type float needs high"),
    ],
)  # fmt: skip
def test_a_bad_space_is_one_clear_error(workdir, capsys, text, message):
    (workdir / "runs").mkdir()
    (workdir / "space.yaml").write_text(text)
    with pytest.raises(SystemExit) as exit:
        search.main(searching(workdir / "space.yaml", study="bad"))
    assert exit.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("ERROR: --space ") and message in err and err.count("\n") == 1
    assert "bad" not in optuna.get_all_study_names("sqlite:///runs/tiny.db")  # nothing ran


def test_without_optuna_one_line_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    with pytest.raises(SystemExit) as exit:
        search.main(["--config", "x.yaml", "--space", "y.yaml"])
    assert exit.value.code == 1
    assert capsys.readouterr().err == "ERROR: optuna is not installed: pip install -e '.[search]'\n"
