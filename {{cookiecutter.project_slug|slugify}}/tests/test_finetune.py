"""Fine-tuning: --model.init_from, a frozen backbone and its unfreezing, learning rates per
parameter group, LoRA adapters and their merging, the limited labelled set of the
DataModules, and one clear error for every checkpoint that cannot be used."""

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, SMALL, Payload, run_cli, write_dataset, write_images, write_table
from torch import nn

from {{ cookiecutter.package_name }}.cli import run
from {{ cookiecutter.package_name }}.data import CSVDataModule, MNISTDataModule
from {{ cookiecutter.package_name }}.errors import UserError
from {{ cookiecutter.package_name }}.models import FineTuner
from {{ cookiecutter.package_name }}.models.finetune import LoRALinear, merge_lora

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

MLP = ["--model.width=32"]  # the pretrained checkpoint's backbone: mlp 784-32-32
TUNE = ["--model.class_path={{ cookiecutter.package_name }}.models.FineTuner"]  # the fine-tuning model, as configs/finetune*.yaml pick it
SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
CHECKPOINTS = Path("logs") / "digits_mlp" / "version_0" / "checkpoints"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """last.ckpt of a short `fit` of the mlp (width 32) on synthetic MNIST."""
    where = tmp_path_factory.mktemp("pretrained")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(where)
        write_dataset(where / "data" / "mnist")
        run(["fit", *SMALL, *SHORT, *MLP])
    return where / CHECKPOINTS / "last.ckpt"


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def backbone_and_head(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(("backbone.", "head."))}


def trainer(*callbacks, epochs: int = 1, batches: int = 3) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        limit_train_batches=batches,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )


def small_data(**kwargs) -> MNISTDataModule:
    return MNISTDataModule(data_dir="data", val_size=100, **kwargs)


class Snapshots(L.Callback):
    """Copies of the state dict, trainable flags and BatchNorm modes at the start and after each epoch."""

    def __init__(self):
        self.states, self.trainable, self.bn_training = {}, {}, {}

    def _take(self, key, module):
        self.states[key] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.trainable[key] = {k: p.requires_grad for k, p in module.named_parameters()}

    def on_train_start(self, trainer, pl_module):
        self._take("start", pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        bns = [m for m in pl_module.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
        self.bn_training.setdefault(trainer.current_epoch, set()).update(m.training for m in bns)

    def on_train_epoch_end(self, trainer, pl_module):
        self._take(trainer.current_epoch, pl_module)


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


# init_from


def test_init_from_same_classes_loads_backbone_and_head(workdir, pretrained, capsys):
    cli = run(["fit", *SMALL, *TUNE, *MLP, f"--model.init_from={pretrained}", "--trainer.max_steps=0"])
    expected = backbone_and_head(weights(pretrained))
    assert len(expected) == 6  # two hidden layers and the head, weight and bias each
    got = cli.model.state_dict()
    assert not changed(expected, got), "the model before its first step holds the checkpoint's weights"
    assert f"Initialised from {pretrained}: backbone and head loaded" in capsys.readouterr().out


@pytest.mark.parametrize(
    "data, classes, why",
    [
        (["--data.classes=[3, 1, 4]"], 3, "the checkpoint has 10 classes, this model 3"),
        (["--data.name=fashion_mnist"], 10, "the checkpoint's classes 0, 1, 2"),
    ],
    ids=["fewer-classes", "other-class-names"],
)
def test_init_from_other_classes_keeps_backbone_and_starts_a_fresh_head(
    workdir, pretrained, capsys, data, classes, why
):
    cli = run(["fit", *SMALL, *TUNE, *MLP, *data, f"--model.init_from={pretrained}", "--trainer.max_steps=0"])
    theirs, ours = weights(pretrained), cli.model.state_dict()
    backbone = {k: v for k, v in theirs.items() if k.startswith("backbone.")}
    assert backbone and not changed(backbone, ours)
    assert ours["head.weight"].shape == (classes, 32)
    if classes == 10:
        assert not torch.equal(ours["head.weight"], theirs["head.weight"])
    out = capsys.readouterr().out
    assert "backbone loaded; the head starts fresh" in out and why in out


def test_fine_tuned_checkpoint_needs_no_init_from_file(workdir, pretrained):
    """test/resume from a fine-tuned run's checkpoint, after its init_from file is gone."""
    shutil.copy(pretrained, "pre.ckpt")
    run(["fit", *SMALL, *SHORT, *TUNE, *MLP, "--model.init_from=pre.ckpt", "--model.lora_rank=2"])
    Path("pre.ckpt").unlink()
    tuned = CHECKPOINTS / "last.ckpt"
    tested = run(["test", *SMALL, f"--ckpt_path={tuned}"])
    assert tested.model.hparams.init_from == "pre.ckpt" and tested.model.hparams.lora_rank == 2
    assert not changed(weights(tuned), tested.model.state_dict())
    assert "test/acc" in tested.trainer.callback_metrics
    resumed = run(
        ["fit", *SMALL, *MLP, f"--ckpt_path={tuned}", "--trainer.max_epochs=2", "--trainer.limit_train_batches=2"]
    )
    assert resumed.trainer.current_epoch == 2 and resumed.trainer.global_step == 4


def missing(where: Path) -> str:
    return "nosuch.ckpt"


def corrupt(where: Path) -> str:
    (where / "corrupt.ckpt").write_bytes(b"PK\x03\x04 this is no checkpoint")
    return "corrupt.ckpt"


def pickled(where: Path) -> str:
    torch.save({"state_dict": {"backbone.1.weight": Payload(str(where / "UNPICKLED"))}}, where / "payload.ckpt")
    return "payload.ckpt"


@pytest.mark.parametrize(
    "make, words",
    [
        (missing, ["--model.init_from=nosuch.ckpt: file not found"]),
        (corrupt, ["corrupt.ckpt: not a readable checkpoint"]),
        (pickled, ["payload.ckpt: refused to load", "weights_only=True"]),
        (
            None,
            [
                "the checkpoint's backbone does not fit this model (4 mismatching tensors",
                "backbone.1.weight: checkpoint (32, 784) vs model (16, 784)",
                "backbone.4.weight: checkpoint (32, 32) vs model (16, 16)",
                "trained with backbone=mlp, width=32, depth=2",
            ],
        ),
    ],
    ids=["missing", "corrupt", "pickled", "incompatible"],
)
def test_unusable_init_from_is_one_error_line(workdir, pretrained, capsys, make, words):
    path = make(workdir) if make else str(pretrained)
    width = "--model.width=16" if make is None else "--model.width=32"
    with pytest.raises(SystemExit) as exit_:
        run_cli("fit", *SMALL, *SHORT, *TUNE, width, f"--model.init_from={path}")
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in errors[0]
    assert not (workdir / "UNPICKLED").exists()


# freezing and learning rates


def test_frozen_backbone_stays_unchanged_then_trains_after_the_unfreeze_epoch(workdir, capsys):
    model = FineTuner(backbone="cnn", width=4, depth=1, freeze_backbone=True, unfreeze_at_epoch=1)
    snaps = Snapshots()
    trainer(snaps, epochs=2).fit(model, small_data())
    start, first, second = snaps.states["start"], snaps.states[0], snaps.states[1]
    backbone = {k for k in start if k.startswith("backbone.")}
    assert any("running_mean" in k for k in backbone)  # BatchNorm statistics are compared too
    assert not changed(start, first) & backbone, "epoch 0: nothing of the frozen backbone moved"
    assert {"head.weight", "head.bias"} <= changed(start, first)
    assert not any(v for k, v in snaps.trainable[0].items() if k.startswith("backbone."))
    assert snaps.bn_training[0] == {False}, "frozen BatchNorm layers run in eval mode"
    assert all(v for k, v in snaps.trainable[1].items() if k.startswith("backbone."))
    assert snaps.bn_training[1] == {True}
    moved = changed(first, second) & backbone
    assert {"backbone.0.weight", "backbone.1.running_mean", "backbone.3.weight"} <= moved
    out = capsys.readouterr().out
    assert "Trainable parameters: 50 of " in out and "head only (backbone frozen until epoch 1)" in out
    assert "Epoch 1: backbone unfrozen. Trainable parameters:" in out


def test_backbone_frozen_for_good_without_unfreeze_epoch(workdir):
    model = FineTuner(width=16, freeze_backbone=True)
    snaps = Snapshots()
    trainer(snaps, epochs=2, batches=2).fit(model, small_data())
    backbone = {k for k in snaps.states["start"] if k.startswith("backbone.")}
    assert not changed(snaps.states["start"], snaps.states[1]) & backbone
    # ... while the head trained, in each epoch: the run was not a no-op.
    assert {"head.weight", "head.bias"} <= changed(snaps.states["start"], snaps.states[0])
    assert {"head.weight", "head.bias"} <= changed(snaps.states[0], snaps.states[1])


class LearningRates(L.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append({g.get("name", "all"): g["lr"] for g in trainer.optimizers[0].param_groups})


def test_learning_rate_per_parameter_group(workdir):
    model = FineTuner(width=16, lr=0.01, backbone_lr_scale=0.1, warmup_steps=2, lora_rank=2)
    rates = LearningRates()
    trainer(rates, batches=4).fit(model, small_data())
    (opt,) = model.trainer.optimizers
    groups = {g["name"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert set(groups) == {"backbone", "head"}
    adapters = {id(p) for n, p in model.backbone.named_parameters() if "lora_" in n}
    base = {id(p) for n, p in model.backbone.named_parameters() if "lora_" not in n}
    assert groups["backbone"] == base
    assert groups["head"] == adapters | {id(p) for p in model.head.parameters()}
    assert rates.steps[0] == pytest.approx({"backbone": 0.0005, "head": 0.005})  # warm-up: 1/2 of the peak
    assert rates.steps[1] == pytest.approx({"backbone": 0.001, "head": 0.01})
    assert rates.steps[3] == pytest.approx({"backbone": 0.0005, "head": 0.005})  # half-way down the cosine


def test_one_parameter_group_by_default(workdir):
    model = FineTuner(width=16)
    trainer(batches=1).fit(model, small_data())
    (opt,) = model.trainer.optimizers
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == len(list(model.parameters()))


# LoRA


def test_lora_trains_only_adapters_and_head(workdir, capsys):
    model = FineTuner(width=32, lora_rank=4, lora_alpha=8)
    wrapped = [m for m in model.backbone.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 and all(m.scale == 2.0 for m in wrapped)
    snaps = Snapshots()
    trainer(snaps).fit(model, small_data())
    moved = changed(snaps.states["start"], snaps.states[0])
    adapters = {k for k in snaps.states["start"] if k.endswith(("lora_a", "lora_b"))}
    assert moved == adapters | {"head.weight", "head.bias"}
    expected = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or n.startswith("head."))
    total = sum(p.numel() for p in model.parameters())
    assert expected == 4 * 784 + 32 * 4 + 4 * 32 + 32 * 4 + 32 * 10 + 10
    assert f"Trainable parameters: {expected:,} of {total:,}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "options, layers",
    [({"backbone": "mlp", "width": 32}, 2), ({"backbone": "vit", "width": 16, "depth": 2, "heads": 2}, 4)],
    ids=["mlp", "vit"],
)
def test_merged_lora_gives_the_same_outputs(options, layers):
    torch.manual_seed(0)
    model = FineTuner(lora_rank=3, **options).eval()
    wrapped = [m for m in model.backbone.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == layers  # the vit: the two MLP layers of each block, not the attention's
    for m in wrapped:
        nn.init.normal_(m.lora_b)  # as if trained: the adapters change the outputs
    x = torch.randn(5, 1, 28, 28)
    before = model(x)
    merge_lora(model.backbone)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert not any("lora_" in k for k in model.state_dict())
    assert torch.allclose(model(x), before, atol=1e-5)
    assert not torch.allclose(model(x), FineTuner(**options).eval()(x), atol=1e-3)


def test_lora_on_a_cnn_is_an_error():
    with pytest.raises(UserError, match="backbone 'cnn' has no Linear layers"):
        FineTuner(backbone="cnn", lora_rank=4)


def test_predict_from_a_lora_checkpoint_uses_merged_weights(workdir, pretrained):
    run(["fit", *SMALL, *SHORT, *TUNE, *MLP, f"--model.init_from={pretrained}", "--model.lora_rank=4"])
    tuned = CHECKPOINTS / "last.ckpt"
    assert any(k.endswith("lora_b") for k in weights(tuned))
    cli = run(["predict", *SMALL, f"--ckpt_path={tuned}"])
    assert not any(isinstance(m, LoRALinear) for m in cli.model.modules())
    unmerged = FineTuner.load_from_checkpoint(tuned, weights_only=True).eval()
    x, _ = cli.datamodule.on_after_batch_transfer(next(iter(cli.datamodule.predict_dataloader())), 0)
    first = cli.trainer.predict_loop.predictions[0]
    assert torch.allclose(first, unmerged(x).softmax(-1), atol=1e-5)


# the labelled subset of the DataModules


def test_samples_per_class_is_reproducible_and_leaves_val_and_test_whole(workdir):
    full, few, again = small_data(), small_data(samples_per_class=7), small_data(samples_per_class=7)
    other = small_data(samples_per_class=7, seed=1)
    for data in (full, few, again, other):
        data.setup("fit")
    x, y = few.splits["train"]
    assert torch.bincount(y).tolist() == [7] * 10
    assert torch.equal(x, again.splits["train"][0]) and not torch.equal(x, other.splits["train"][0])
    for split in ("val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(few.splits[split], full.splits[split]))
    flat, pool = x.flatten(1), full.splits["train"][0].flatten(1)
    assert (flat[:, None] == pool[None]).all(-1).any(1).all(), "the subset is taken from the training split"


def test_train_fraction_of_each_class_on_a_table(tmp_path):
    path = write_table(tmp_path / "table.csv", rows=90)
    full, half = CSVDataModule(str(path)), CSVDataModule(str(path), train_fraction=0.5)
    full.setup("fit"), half.setup("fit")
    counts, halves = torch.bincount(full.splits["train"][1]), torch.bincount(half.splits["train"][1])
    assert halves.tolist() == [round(c / 2) for c in counts.tolist()]
    assert torch.equal(half.splits["test"][0], full.splits["test"][0])


def test_classes_keeps_and_relabels_the_chosen_classes(workdir):
    full, some = small_data(), small_data(classes=[7, 2])
    full.setup("fit"), some.setup("fit")
    assert some.num_classes == 2 and some.class_names == ["7", "2"]
    x, y = some.splits["test"]
    fx, fy = full.splits["test"]
    assert torch.equal(x[y == 0], fx[fy == 7]) and torch.equal(x[y == 1], fx[fy == 2])
    assert len(y) == int(((fy == 7) | (fy == 2)).sum())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"samples_per_class": 1000}, "class '0' has only"),
        ({"samples_per_class": 1000, "name": "fashion_mnist", "classes": [5, 6]}, "class 'Sandal' has only"),
        ({"samples_per_class": 0}, "samples_per_class=0 must be at least 1"),
        ({"train_fraction": 0.0}, r"train_fraction=0.0 must be in \(0, 1\]"),
        ({"train_fraction": 1.5}, r"train_fraction=1.5 must be in \(0, 1\]"),
        ({"classes": [3, 3]}, "give at least two different class numbers from 0 to 9"),
        ({"classes": [4, 10]}, "give at least two different class numbers from 0 to 9"),
    ],
)
def test_bad_subset_options_are_user_errors(workdir, options, message):
    with pytest.raises(UserError, match=message):
        small_data(**options).setup("fit")


# the shipped config


def test_finetune_config_after_the_cnn_config(workdir, capsys):
    """The README's walk-through: pretrain with mnist_cnn.yaml, fine-tune with finetune.yaml, test."""
    configs = ROOT / "configs"
    run_cli("fit", f"--config={configs / 'mnist_cnn.yaml'}", *SMALL, *SHORT)
    best = Path("logs") / "mnist_cnn" / "version_0" / "checkpoints" / "best.ckpt"
    finetune = f"--config={configs / 'finetune.yaml'}"
    cli = run(["fit", *SMALL, finetune, *SHORT, "--trainer.max_epochs=2", "--model.unfreeze_at_epoch=1",
               f"--model.init_from={best}"])  # fmt: skip
    out = capsys.readouterr().out
    assert "backbone loaded; the head starts fresh (the checkpoint's classes 0, 1, 2" in out
    assert "head only (backbone frozen until epoch 1)" in out and "Epoch 1: backbone unfrozen" in out
    assert torch.bincount(cli.datamodule.splits["train"][1]).tolist() == [20] * 10
    tested = run(["test", *SMALL, finetune, "--ckpt_path=best"])
    assert "test/acc" in tested.trainer.callback_metrics


@pytest.mark.parametrize(
    "pretrain, finetune, data, trains",
    [
        ("custom_csv", "finetune_csv", "--data.path=table.csv", "head + LoRA adapters"),
        ("custom_images", "finetune_images", "--data.root=images", "head only (backbone frozen until epoch 5)"),
    ],
)
def test_finetune_configs_for_your_own_data(workdir, capsys, pretrain, finetune, data, trains):
    write_table(workdir / "table.csv", rows=90)
    write_images(workdir / "images")
    quiet = [a for a in SMALL if not a.startswith("--data.")]
    run_cli("fit", f"--config={ROOT / 'configs' / (pretrain + '.yaml')}", data, *quiet, *SHORT)
    best = Path("logs") / pretrain / "version_0" / "checkpoints" / "best.ckpt"
    config = f"--config={ROOT / 'configs' / (finetune + '.yaml')}"
    cli = run(["fit", config, data, *quiet, *SHORT, f"--model.init_from={best}", "--data.train_fraction=0.5"])
    out = capsys.readouterr().out
    assert f"Initialised from {best}: backbone and head loaded" in out and trains in out
    data = cli.datamodule
    options = {k: v for k, v in data.hparams.items() if not k.startswith("_")}
    whole = type(data)(**{**options, "train_fraction": 1.0})
    whole.setup("fit")
    halves = [max(1, round(n / 2)) for n in torch.bincount(whole.splits["train"][1]).tolist()]
    assert torch.bincount(data.splits["train"][1]).tolist() == halves


def test_unfreezing_is_refused_with_more_than_one_process():
    """DDP fixes the set of trained parameters when it wraps the model: unfreezing later would not train."""
    model = FineTuner(width=16, freeze_backbone=True, unfreeze_at_epoch=1)
    model.trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False)
    assert model.trainer.world_size == 2
    with pytest.raises(UserError, match="unfreeze_at_epoch with more than one process.*--model.freeze_backbone=false"):
        model.setup("fit")
    model.hparams.unfreeze_at_epoch = None  # frozen for good: nothing changes under DDP, so it is allowed
    model.setup("fit")
