"""Augmentation of training batches (data/augment.py): what each option does to the pixels, that it
is drawn per image from a seeded generator, that only training batches get it, and its errors."""

from types import SimpleNamespace

import pytest
import torch
from conftest import SMALL
from lightning.pytorch.plugins.precision import Precision
from test_crash_safety import RUNS, Crash, CrashAt, every_n_steps_config, weights

from {{ cookiecutter.package_name }}.cli import run
from {{ cookiecutter.package_name }}.data.augment import Augmentation, augment, batch_generator
from {{ cookiecutter.package_name }}.data.mnist import MNISTDataModule
from {{ cookiecutter.package_name }}.errors import UserError


def dots(n: int, size: int = 16) -> torch.Tensor:
    """n images, each black with one white pixel in the middle."""
    x = torch.zeros(n, 1, size, size)
    x[:, 0, size // 2, size // 2] = 1.0
    return x


def generator(*seeds: int) -> torch.Generator:
    return batch_generator(torch.device("cpu"), *seeds)


def test_translate_moves_each_image_by_at_most_that_many_pixels_in_each_direction():
    shifted = augment(dots(500), Augmentation(translate=2), generator(0))
    where = [tuple((image[0] == 1).nonzero()[0].tolist()) for image in shifted]
    assert all(image.sum() == 1 for image in shifted)  # the dot moved, whole
    moves = {(r - 8, c - 8) for r, c in where}
    assert moves == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}  # all 25 shifts occur


def test_flip_mirrors_about_half_of_the_images_and_leaves_the_rest():
    x = torch.rand(1000, 3, 8, 8)
    flipped = augment(x, Augmentation(flip=True), generator(0))
    mirrored = (flipped == x.flip(-1)).flatten(1).all(1)
    kept = (flipped == x).flatten(1).all(1)
    assert bool((mirrored | kept).all()) and 400 < int(mirrored.sum()) < 600


def test_erase_blacks_out_one_rectangle_of_an_eighth_to_a_half_of_each_side():
    erased = augment(torch.ones(300, 1, 16, 16), Augmentation(erase=1.0), generator(0))
    for image in erased[:, 0]:
        rows, columns = (image == 0).nonzero().unbind(1)
        height, width = int(rows.max() - rows.min() + 1), int(columns.max() - columns.min() + 1)
        assert 2 <= height <= 8 and 2 <= width <= 8
        assert int((image == 0).sum()) == height * width  # a filled rectangle
    half = augment(torch.ones(1000, 1, 16, 16), Augmentation(erase=0.5), generator(0))
    assert 400 < int((half == 0).flatten(1).any(1).sum()) < 600


def test_the_draws_depend_only_on_the_seeds():
    how = Augmentation(translate=3, flip=True, erase=0.5)
    x = torch.rand(64, 1, 28, 28)
    assert torch.equal(augment(x, how, generator(42, 1, 7, 0)), augment(x, how, generator(42, 1, 7, 0)))
    assert not torch.equal(augment(x, how, generator(42, 1, 7, 0)), augment(x, how, generator(42, 1, 8, 0)))
    assert not torch.equal(augment(x, how, generator(42, 1, 7, 0)), augment(x, how, generator(42, 1, 7, 1)))


def test_only_training_batches_are_augmented(workdir):
    dm = MNISTDataModule(data_dir="data", name="fashion_mnist", val_size=100, download=False, translate=2, flip=True)
    dm.setup("fit")
    dm.shuffle_seed = 42
    batch = (dm.splits["train"][0][:32], dm.splits["train"][1][:32])
    plain = batch[0].float() / 255
    for training in (False, True):
        # Precision(): 32-bit, which leaves the batch's dtype as it is (bf16-true would convert it)
        dm.trainer = SimpleNamespace(training=training, current_epoch=0, global_rank=0, precision_plugin=Precision())
        x, y = dm.on_after_batch_transfer(batch, 0)
        assert torch.equal(y, batch[1]) and torch.equal(x, plain) != training


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"flip": True}, "flip=true mirrors images, and a mirrored mnist image is another sign"),
        ({"translate": 14}, "translate=14 must be from 0 to 13 pixels for 28x28 images"),
        ({"erase": 1.5}, "erase=1.5 is a probability"),
    ],
)
def test_settings_that_cannot_apply_are_refused(workdir, options, message):
    with pytest.raises(UserError, match=message):
        MNISTDataModule(data_dir="data", name="mnist", val_size=100, download=False, **options).setup("fit")


def test_resume_mid_epoch_with_augmentation_gives_the_same_weights(workdir):
    """As test_crash_safety's test without augmentation: the draws of the resumed epoch's
    remaining batches are those of the uninterrupted run."""
    plain = ["fit", *SMALL, every_n_steps_config(workdir, 3), "--trainer.max_epochs=2",
             "--trainer.limit_val_batches=2", "--trainer.deterministic=true"]  # fmt: skip
    args = [*plain, "--data.translate=2", "--data.erase=0.5"]
    run([*args, "--trainer.logger.init_args.version=reference"])
    reference = weights(workdir / RUNS / "reference" / "checkpoints" / "last.ckpt")
    run([*plain, "--trainer.logger.init_args.version=plain"])
    unaugmented = weights(workdir / RUNS / "plain" / "checkpoints" / "last.ckpt")
    assert not all(torch.equal(unaugmented[k], reference[k]) for k in reference)  # augmentation was on

    with pytest.raises(Crash):
        run([*args, "--trainer.logger.init_args.version=crashed"], callbacks=[CrashAt(12)])
    run([*args, "--trainer.logger.init_args.version=crashed", "--ckpt_path=last"])
    final = weights(workdir / RUNS / "crashed" / "checkpoints" / "last.ckpt")
    assert all(torch.equal(final[k], reference[k]) for k in reference)
