"""Your own network (README, "Bring your own network"): the tutorial's MLP in my_network.py, trained,
tested, predicted and exported through the project with configs/my_network.yaml and nothing else."""

import csv

import torch
from conftest import ROOT, run_train_py

import my_network
from {{ cookiecutter.package_name }}.cli import run
{%- if cookiecutter.export == "yes" %}
from {{ cookiecutter.package_name }}.export import main as export_main
{%- endif %}
from {{ cookiecutter.package_name }}.models import Classifier

CONFIG = ["--config", str(ROOT / "configs" / "my_network.yaml"), "--trainer.enable_progress_bar=false"]


def test_tutorial_mlp_trains_tests_predicts{% if cookiecutter.export == "yes" %}_and_exports{% endif %}(workdir, capsys):
    fit = run(["fit", *CONFIG, "--trainer.max_epochs=6"])
    assert isinstance(fit.model.backbone[1], my_network.MLP) and isinstance(fit.model.backbone[0], torch.nn.Flatten)
    assert float(fit.trainer.callback_metrics["val/acc"]) > 0.85  # 10 classes: chance is 0.1
    best = next((workdir / "logs" / "my_network" / "version_0" / "checkpoints").glob("best*.ckpt"))
    checkpoint = torch.load(best, weights_only=True)  # nothing pickled: the network is a class path
    network = checkpoint["hyper_parameters"]["network"]
    assert network["class_path"] == "my_network.MLP" and network["init_args"]["input_size"] == 64
    assert checkpoint["state_dict"]["normalize.std"].ne(1).all()  # the digits' statistics, saved

    tested = run(["test", *CONFIG, "--ckpt_path=best"])
    assert float(tested.trainer.callback_metrics["test/acc"]) > 0.85
    run(["predict", *CONFIG, "--ckpt_path=best", "--predictions.output=predictions.csv"])
    rows = list(csv.DictReader(open(workdir / "predictions.csv")))
    assert len(rows) == 359 and {row["predicted"] for row in rows} <= {str(d) for d in range(10)}
{%- if cookiecutter.export == "yes" %}

    assert export_main(["--ckpt_path", str(best), "--log_dir", "logs"]) == 0
    program = torch.export.load(best.with_suffix(".pt2")).module()
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(program(x), tested.model.eval()(x), atol=1e-5)
{%- endif %}


def test_network_that_does_not_fit_the_data_is_one_error_line(workdir):
    result = run_train_py("fit", *CONFIG, "--model.network.init_args.input_size=784", cwd=workdir)
    assert result.returncode == 1, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert "model.network MLP: fails on a batch of this data's inputs, shape (batch, 1, 8, 8)" in line
    assert "Traceback" not in result.stderr

    result = run_train_py("fit", *CONFIG, "--model.network.init_args.output_size=3", cwd=workdir)
    assert result.returncode == 1 and "returns (2, 3) for a batch of 2, not (2, 10)" in result.stderr
    assert "Traceback" not in result.stderr


def test_checkpoint_naming_a_foreign_class_is_refused(workdir):
    run(["fit", *CONFIG, "--trainer.max_epochs=1"])
    best = next((workdir / "logs" / "my_network" / "version_0" / "checkpoints").glob("best*.ckpt"))
    checkpoint = torch.load(best, weights_only=True)
    checkpoint["hyper_parameters"]["network"]["class_path"] = "antigravity.Fly"  # stdlib, never imported here
    torch.save(checkpoint, workdir / "foreign.ckpt")
    result = run_train_py("test", *CONFIG, "--ckpt_path=foreign.ckpt", cwd=workdir)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "name the class antigravity.Fly, which is neither imported nor in a module under this folder" in (
        result.stderr
    )
    assert "antigravity" not in __import__("sys").modules


def test_network_built_in_python_is_not_stored_in_hyperparameters():
    model = Classifier(num_classes=10, input_shape=(1, 8, 8), network=my_network.MLP(64, 32, 10))
    assert "network" not in model.hparams  # a module would not load with weights_only=True
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 10)


def test_a_network_builder_gets_the_data_shape_and_the_output_count():
    """A class or function instead of a built module: called with the data's input shape and the number
    of outputs (a regression's 1 as well as a classifier's classes), then checked like any network."""
    from {{ cookiecutter.package_name }}.models.nets import own_network

    calls = []

    def builder(input_shape, outputs):
        calls.append((input_shape, outputs))
        return my_network.MLP(input_shape[-1] * input_shape[-2], 16, outputs)

    network = own_network(builder, (1, 8, 8), 1)
    assert calls == [((1, 8, 8), 1)]
    assert network(torch.rand(3, 1, 8, 8)).shape == (3, 1)  # flattened first: the MLP starts with nn.Linear


def test_freezing_your_own_network_is_refused():
    from {{ cookiecutter.package_name }}.errors import UserError
    from {{ cookiecutter.package_name }}.models import FineTuner

    try:
        FineTuner(num_classes=10, input_shape=(1, 8, 8), network=my_network.MLP(64, 32, 10), freeze_backbone=True)
    except UserError as err:
        assert "freeze_backbone with model.network" in str(err)
    else:
        raise AssertionError("freeze_backbone with an own network was accepted")
