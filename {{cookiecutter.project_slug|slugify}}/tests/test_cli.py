"""The command line end to end, in this process: every config runs, training learns,
checkpoints are safe and complete, every subcommand works from a checkpoint, and the logs
hold what TensorBoard shows."""

from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, SMALL, run_cli, run_train_py, write_images, write_numbers, write_table
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from {{ cookiecutter.package_name }}.cli import run
from {{ cookiecutter.package_name }}.data import MNISTDataModule
from {{ cookiecutter.package_name }}.models import Classifier

# run() is given its arguments while pytest's are in sys.argv: intended here.
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

# text_*.yaml and sft_*.yaml need a model folder: test_text.py and test_chat.py run them with tiny models.
CONFIGS = [c for c in sorted((ROOT / "configs").glob("*.yaml")) if not c.stem.startswith(("text_", "sft_"))]
RUN = Path("logs") / "digits_mlp" / "version_0"  # where the default config's first run logs
QUIET = [a for a in SMALL if not a.startswith("--data.")]  # for any data module


def fit(*args: str):
    return run(["fit", *SMALL, *args])


def data_args(config: Path, where: Path) -> list[str]:
    """Options that point a config at small local data of the kind it reads."""
    data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    kind = data.get("class_path", "MNISTDataModule").rsplit(".", 1)[-1]
    if kind == "CSVDataModule" and (data.get("init_args") or {}).get("task") == "regression":
        return [f"--data.path={write_numbers(where / 'numbers.csv')}", "--data.label_column=y"]
    if kind == "CSVDataModule":
        return [f"--data.path={write_table(where / 'table.csv')}"]
    if kind == "ImageFolderDataModule":
        return [f"--data.root={write_images(where / 'images')}"]
{%- if cookiecutter.gpt == "yes" %}
    if kind == "CorpusDataModule":  # the gpt part (tests/test_gpt.py)
        from test_gpt import write_text

        # gpt_small on a CPU: no compilation (minutes), a short context, in memory, 2 of its 12 layers.
        path = write_text(where / "corpus.txt", lines=300)
        small = ["--data.block_size=16", "--data.streaming=false", "--model.compile=false", "--model.n_layer=2"]
        return [f"--data.path={path}", *small]
{%- endif %}
    assert kind == "MNISTDataModule", f"{config.name}: no test data for {kind}; add it to data_args"
    return ["--data.data_dir=data", "--data.val_size=100"]


def test_every_config_is_found():
    assert {"digits_mlp", "mnist_mlp", "mnist_cnn", "fashion_mnist_cnn", "custom_csv", "custom_images"} <= {
        c.stem for c in CONFIGS
    }


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_fast_dev_run_of_every_config(workdir, config):
    cli = run(["fit", f"--config={config}", "--trainer.fast_dev_run=true", *QUIET, *data_args(config, workdir)])
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1
    # The data's sizes reached the model through the links of the command line.
    if "vocab_size" in cli.model.hparams:  # a language model: the tokenizer's size
        assert cli.model.hparams.vocab_size == cli.datamodule.vocab_size > 0
        return
    assert tuple(cli.model.hparams.input_shape) == tuple(cli.datamodule.input_shape)
    if not getattr(cli.datamodule, "regression", False):  # a Regressor has one output and no classes
        assert cli.model.hparams.num_classes == cli.datamodule.num_classes
        assert cli.model.hparams.class_names == cli.datamodule.class_names


def test_short_fit_beats_chance_and_test_from_best_checkpoint(workdir):
    cli = fit("--trainer.max_epochs=3")
    assert cli.trainer.current_epoch == 3
    assert float(cli.trainer.callback_metrics["val/acc"]) >= 0.5  # chance is 0.1
    best = workdir / RUN / "checkpoints" / "best.ckpt"
    tested = run(["test", *SMALL, f"--ckpt_path={best}"])
    assert float(tested.trainer.callback_metrics["test/acc"]) >= 0.5


def plain(value) -> bool:
    """Whether `value` is built only from numbers, strings, None, lists, tuples and dicts."""
    if isinstance(value, (list, tuple)):
        return all(plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


def test_checkpoints_are_safe_and_rebuild_the_model(workdir):
    cli = fit("--trainer.max_epochs=2")
    folder = workdir / RUN / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(folder / "best.ckpt", weights_only=True)["global_step"] > 0

    ckpt = torch.load(folder / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == cli.trainer.global_step
    hparams = ckpt["hyper_parameters"]
    assert plain(hparams), hparams
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_")}
    assert kwargs["backbone"] == "mlp" and kwargs["num_classes"] == 10
    assert list(kwargs["class_names"]) == [str(d) for d in range(10)]

    rebuilt = Classifier(**kwargs)
    rebuilt.load_state_dict(ckpt["state_dict"])
    loaded = Classifier.load_from_checkpoint(folder / "last.ckpt", map_location="cpu")
    x, _ = cli.datamodule.on_after_batch_transfer(next(iter(cli.datamodule.test_dataloader())), 0)
    with torch.no_grad():
        expected = cli.model.eval()(x)
        assert torch.equal(rebuilt.eval()(x), expected)
        assert torch.equal(loaded.eval()(x), expected)
    # ...and it is not trivially so: an untrained model predicts something else.
    with torch.no_grad():
        assert not torch.equal(Classifier(**kwargs).eval()(x), expected)


def test_validate_test_predict_from_checkpoint(workdir):
    trained = fit("--trainer.max_epochs=2")
    folder = workdir / RUN / "checkpoints"
    best, last = folder / "best.ckpt", folder / "last.ckpt"
    # val/acc is perfect after the first epoch, so best.ckpt stays there while last.ckpt moves on.
    assert torch.load(best, weights_only=True)["global_step"] < torch.load(last, weights_only=True)["global_step"]
    final_val_loss = float(trained.trainer.callback_metrics["val/loss"])
    best_score = float(trained.trainer.checkpoint_callback.best_model_score)

    for given, file in ((str(best), best), ("best", best), ("last", last)):
        cli = run(["validate", *SMALL, f"--ckpt_path={given}"])
        assert Path(cli.trainer.ckpt_path).resolve() == file.resolve(), given
        metrics = cli.trainer.callback_metrics
        assert float(metrics["val/acc"]) >= 0.5
        if file == last:  # the very weights the fit ended with: the same validation loss
            assert float(metrics["val/loss"]) == pytest.approx(final_val_loss)
        else:  # the weights that scored best_model_score
            assert float(metrics["val/acc"]) == pytest.approx(best_score)

        cli = run(["test", *SMALL, f"--ckpt_path={given}"])
        assert Path(cli.trainer.ckpt_path).resolve() == file.resolve(), given
        assert float(cli.trainer.callback_metrics["test/acc"]) >= 0.5

        cli = run(["predict", *SMALL, f"--ckpt_path={given}"])
        assert Path(cli.trainer.ckpt_path).resolve() == file.resolve(), given
        probs = torch.cat(cli.trainer.predict_loop.predictions)
        labels = cli.datamodule.splits["test"][1]
        assert probs.shape == (len(labels), 10)
        assert (probs >= 0).all()
        assert torch.allclose(probs.sum(dim=1), torch.ones(len(labels)), atol=1e-5)
        assert (probs.argmax(dim=1) == labels).float().mean() >= 0.5


def test_best_checkpoint_before_any_fit_is_an_error(workdir, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli("validate", *SMALL, "--ckpt_path=best")
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and "--ckpt_path=best" in errors[0] and "no best checkpoint" in errors[0], err


def test_tensorboard_logs(workdir):
    fit("--trainer.max_epochs=2", "--trainer.log_every_n_steps=1")
    run_dir = workdir / RUN
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert (run_dir / "config.yaml").is_file() and (run_dir / "hparams.yaml").is_file()

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss_step", "train/loss_epoch", "train/acc", "train/f1", "val/loss", "val/acc", "val/f1"}
    assert expected | {"hp_metric", "lr-AdamW"} <= tags, tags
    assert len(events.Scalars("val/acc")) == 2  # one per epoch
    # hp_metric is val/acc at each validation: no -1 point at step 0 (Lightning's default) to squash the chart
    assert [s.value for s in events.Scalars("hp_metric")] == [s.value for s in events.Scalars("val/acc")]
    lr = [s.value for s in events.Scalars("lr-AdamW")]
    assert lr[0] == pytest.approx(1e-3) and lr[-1] < lr[0]  # the cosine schedule decays


def test_print_config(workdir):
    result = run_train_py("fit", "--print_config", cwd=workdir)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["model"]["class_path"] == "{{ cookiecutter.package_name }}.models.Classifier"
    assert config["seed_everything"] == 42


def test_default_config_trains_an_mlp_on_mnist(workdir):
    cli = fit("--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1")
    assert isinstance(cli.datamodule, MNISTDataModule) and cli.datamodule.hparams.name == "mnist"
    assert cli.model.hparams.backbone == "mlp"
    saved = yaml.safe_load((workdir / RUN / "config.yaml").read_text())
    assert saved["seed_everything"] == 42
    assert saved["model"]["init_args"]["backbone"] == "mlp"
    assert saved["data"]["init_args"]["name"] == "mnist"


def test_second_fit_gets_a_new_version_and_resume_continues_the_newest(workdir):
    short = ["--trainer.max_epochs=1", "--trainer.limit_val_batches=1"]
    steps = fit(*short).trainer.global_step
    assert fit(*short).trainer.global_step == steps
    runs = workdir / "logs" / "digits_mlp"
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]
    assert all((runs / v / "config.yaml").is_file() for v in ("version_0", "version_1"))

    resumed = fit("--ckpt_path=last", "--trainer.max_epochs=2", "--trainer.limit_val_batches=1")
    last = runs / "version_1" / "checkpoints" / "last.ckpt"
    assert Path(resumed.trainer.ckpt_path).resolve() == last.resolve()
    assert resumed.trainer.global_step == 2 * steps  # continued, not restarted
    assert torch.load(last, weights_only=True)["global_step"] == 2 * steps
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]  # resumed in place
