"""MNISTDataModule on synthetic IDX files, and the in-memory batches every DataModule here uses."""

import math

import lightning as L
import pytest
import torch
from conftest import synthetic_digits
from torch.utils.data import DataLoader

from {{ cookiecutter.package_name }}.data import batches
from {{ cookiecutter.package_name }}.data.batches import TensorSamples, already_stacked
from {{ cookiecutter.package_name }}.data.idx import write_idx
from {{ cookiecutter.package_name }}.data.mnist import DATASETS, FILES, MNISTDataModule
from {{ cookiecutter.package_name }}.errors import UserError
from {{ cookiecutter.package_name }}.models.nets import Normalize

N_TRAIN, N_TEST, VAL = 300, 100, 50


def unique_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic digits whose two top-left pixels spell the image's index, so each is unique."""
    x, y = synthetic_digits(n, seed)
    x[:, 0, 0] = torch.arange(n) % 256
    x[:, 0, 1] = torch.arange(n) // 256
    return x, y


def index_of(x: torch.Tensor) -> torch.Tensor:
    """The index written by `unique_digits`, for a batch of N x 1 x 28 x 28 images."""
    return x[:, 0, 0, 0].long() + 256 * x[:, 0, 0, 1].long()


def write_files(folder, suffix=".gz", train=None, test=None, only=FILES):
    """Write the four IDX files (or those in `only`) into `folder`; returns the data written."""
    train = train or unique_digits(N_TRAIN, 0)
    test = test or unique_digits(N_TEST, 1)
    for stem, values in zip(FILES, (*train, *test)):
        if stem in only:
            write_idx(folder / f"{stem}{suffix}", values)
    return train, test


@pytest.fixture
def data(tmp_path):
    """data_dir with unique MNIST images in data_dir/mnist/; returns (data_dir, train, test)."""
    train, test = write_files(tmp_path / "mnist")
    return tmp_path, train, test


def make(data_dir, **kwargs) -> MNISTDataModule:
    kwargs = {"val_size": VAL, "download": False, "batch_size": 32, **kwargs}
    dm = MNISTDataModule(data_dir=str(data_dir), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


# --- where the files are found ---------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "name, folder",
    [("mnist", "mnist"), ("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw"), ("kmnist", "KMNIST/raw")],
)
def test_finds_files_in_own_and_torchvision_layout(tmp_path, name, folder, suffix):
    train, test = write_files(tmp_path / folder, suffix=suffix)
    dm = make(tmp_path, name=name)
    sizes = {split: len(y) for split, (x, y) in dm.splits.items()}
    assert sizes == {"train": N_TRAIN - VAL, "val": VAL, "test": N_TEST}
    x_test, y_test = dm.splits["test"]
    assert torch.equal(x_test[:, 0], test[0])
    assert torch.equal(y_test, test[1].long())


def test_data_dir_may_be_the_folder_that_holds_the_files(tmp_path):
    """--data.data_dir=/some/folder holding the four IDX files, as copied from elsewhere."""
    train, test = write_files(tmp_path / "copied", suffix="")
    dm = make(tmp_path / "copied")
    assert {split: len(y) for split, (_, y) in dm.splits.items()} == {
        "train": N_TRAIN - VAL,
        "val": VAL,
        "test": N_TEST,
    }
    assert torch.equal(dm.splits["test"][0][:, 0], test[0])
    assert dm.folder_of(FILES[0]) == tmp_path / "copied"


def test_files_may_be_spread_over_folders_and_formats(tmp_path):
    write_files(tmp_path / "mnist", suffix="", only=FILES[:2])
    write_files(tmp_path / "MNIST" / "raw", suffix=".gz", only=FILES[2:])
    dm = make(tmp_path)
    assert len(dm.splits["train"][1]) == N_TRAIN - VAL
    assert len(dm.splits["test"][1]) == N_TEST


def test_finds_files_in_system_folder(tmp_path, monkeypatch):
    system = tmp_path / "usr-share"
    monkeypatch.setitem(DATASETS["fashion_mnist"], "also", [str(system)])
    write_files(system)
    dm = make(tmp_path / "empty", name="fashion_mnist")
    assert len(dm.splits["val"][1]) == VAL


def test_nothing_present_without_download(tmp_path):
    dm = MNISTDataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(UserError) as err:
        dm.prepare_data()
    message = str(err.value)
    for stem in FILES:
        assert stem in message
    assert str(tmp_path / "mnist") in message
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "Download failed" not in message  # nothing was tried
    assert "copy the files into" in message


def test_only_missing_files_are_named(tmp_path):
    write_files(tmp_path / "mnist", only=FILES[:2])
    with pytest.raises(UserError) as err:
        make(tmp_path)
    message = str(err.value)
    assert FILES[2] in message and FILES[3] in message
    assert FILES[0] not in message and FILES[1] not in message


def test_setup_without_prepare_data_also_reports_missing_files(tmp_path):
    dm = MNISTDataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(UserError, match="missing"):
        dm.setup("fit")


# --- what setup builds -------------------------------------------------------------------------


def test_split_is_deterministic_for_a_seed(data):
    data_dir, _, _ = data
    first, again, other = make(data_dir, seed=1), make(data_dir, seed=1), make(data_dir, seed=2)
    val_first = set(index_of(first.splits["val"][0]).tolist())
    train_first = set(index_of(first.splits["train"][0]).tolist())
    assert len(val_first) == VAL and len(train_first) == N_TRAIN - VAL
    assert val_first | train_first == set(range(N_TRAIN))
    assert torch.equal(first.splits["val"][0], again.splits["val"][0])
    assert torch.equal(first.splits["train"][1], again.splits["train"][1])
    assert set(index_of(other.splits["val"][0]).tolist()) != val_first


def test_split_holds_the_file_contents(data):
    data_dir, (x, y), _ = data
    dm = make(data_dir)
    for split in ("train", "val"):
        xs, ys = dm.splits[split]
        i = index_of(xs)
        assert torch.equal(xs[:, 0], x[i])
        assert torch.equal(ys, y[i].long())


@pytest.mark.parametrize(
    "name, first_class, last_class",
    [("mnist", "0", "9"), ("fashion_mnist", "T-shirt/top", "Ankle boot"), ("kmnist", "o", "wo")],
)
def test_dataset_properties(name, first_class, last_class):
    dm = MNISTDataModule(name=name, download=False)
    assert dm.num_classes == 10
    assert dm.input_shape == (1, 28, 28)
    assert len(dm.class_names) == 10
    assert (dm.class_names[0], dm.class_names[-1]) == (first_class, last_class)


def test_setup_twice_keeps_the_splits(data):
    dm = make(data[0])
    train = dm.splits["train"][0]
    dm.setup("test")
    assert dm.splits["train"][0] is train


@pytest.mark.parametrize("which", ["train", "test"])
def test_label_out_of_range(tmp_path, which):
    x, y = unique_digits(N_TRAIN if which == "train" else N_TEST, 0)
    y[7] = 10
    kwargs = {which: (x, y)}
    write_files(tmp_path / "mnist", **kwargs)
    with pytest.raises(UserError) as err:
        make(tmp_path)
    message = str(err.value)
    assert FILES[1 if which == "train" else 3] in message
    assert "label 10 is out of range 0..9" in message


def test_image_and_label_counts_differ(tmp_path):
    x, y = unique_digits(N_TRAIN, 0)
    write_files(tmp_path / "mnist", train=(x, y[:-1]))
    with pytest.raises(UserError) as err:
        make(tmp_path)
    message = str(err.value)
    assert f"{N_TRAIN} images" in message and f"{N_TRAIN - 1} labels" in message
    assert FILES[0] in message and FILES[1] in message


def test_images_of_the_wrong_size(tmp_path):
    """32x32 images would only fail later, inside the model: setup names the file instead."""
    x, y = unique_digits(N_TRAIN, 0)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2))
    write_files(tmp_path / "mnist", train=(x, y))
    with pytest.raises(UserError) as err:
        make(tmp_path)
    assert FILES[0] in str(err.value)
    assert f"({N_TRAIN}, 32, 32)" in str(err.value)
    assert "28 x 28" in str(err.value)


def test_labels_swapped_with_images(tmp_path):
    train, test = unique_digits(N_TRAIN, 0), unique_digits(N_TEST, 1)
    write_files(tmp_path / "mnist", train=(train[1], train[0]), test=test)
    with pytest.raises(UserError, match="28 x 28"):
        make(tmp_path)


@pytest.mark.parametrize("val_size", [0, N_TRAIN, N_TRAIN + 1, -5])
def test_val_size_out_of_range(data, val_size):
    with pytest.raises(UserError) as err:
        make(data[0], val_size=val_size)
    assert f"val_size={val_size}" in str(err.value)
    assert f"between 1 and {N_TRAIN - 1}" in str(err.value)


# --- the in-memory fast path -------------------------------------------------------------------


def epoch(loader) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    xs, ys, sizes = [], [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        sizes.append(len(y))
    return torch.cat(xs), torch.cat(ys), sizes


def test_epoch_yields_every_training_sample_once(data):
    dm = make(data[0], batch_size=32)
    x, y, sizes = epoch(dm.train_dataloader())
    n = N_TRAIN - VAL
    assert sizes == [32] * (n // 32) + [n % 32]
    seen = index_of(x).tolist()
    assert len(seen) == len(set(seen)) == n
    assert set(seen) == set(index_of(dm.splits["train"][0]).tolist())
    assert seen != sorted(seen)  # shuffled


def shuffled_order(dm, seed: int) -> list[int]:
    L.seed_everything(seed, verbose=False)
    return index_of(epoch(dm.train_dataloader())[0]).tolist()


def test_shuffling_is_reproducible(data, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # seed_everything sets it; restored afterwards
    dm = make(data[0])
    first = shuffled_order(dm, 3)
    assert shuffled_order(dm, 3) == first
    assert shuffled_order(dm, 4) != first
    torch.manual_seed(3)
    assert index_of(epoch(dm.train_dataloader())[0]).tolist() == first
    # Two epochs of one run see different orders.
    loader = dm.train_dataloader()
    assert index_of(epoch(loader)[0]).tolist() != index_of(epoch(loader)[0]).tolist()


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_batches_equal_per_sample_indexing(data, split):
    _, train, test = data
    dm = make(data[0], batch_size=16)
    loader = getattr(dm, f"{split}_dataloader")()
    dataset = loader.dataset
    assert isinstance(dataset, TensorSamples)
    torch.manual_seed(0)
    x, y, _ = epoch(loader)
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    assert x.shape[1:] == (1, 28, 28)
    if split != "train":  # unshuffled: exactly the dataset in order
        expected = [dataset[i] for i in range(len(dataset))]
        assert torch.equal(x, torch.stack([xi for xi, _ in expected]))
        assert torch.equal(y, torch.stack([yi for _, yi in expected]))
    # Every sample is the one in the IDX file at its index.
    images, labels = test if split == "test" else train
    i = index_of(x)
    assert torch.equal(x[:, 0], images[i])
    assert torch.equal(y, labels[i].long())
    if split == "test":
        assert i.tolist() == list(range(N_TEST))


def test_pixels_after_transfer_and_the_training_statistics(data):
    """Batches reach the model as pixels in [0, 1]; the model normalises them with the training split's statistics."""
    dm = make(data[0], batch_size=64)
    normalize = Normalize((1, 28, 28))
    normalize.set_statistics(dm.mean, dm.std)
    xs, ys = [], []
    for batch in dm.train_dataloader():
        pixels, y = dm.on_after_batch_transfer(batch, 0)
        assert pixels.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(pixels, batch[0].float() / 255)
        xs.append(normalize(pixels))
        ys.append(y)
    x = torch.cat(xs)
    assert x.shape == (N_TRAIN - VAL, 1, 28, 28)
    assert abs(x.mean().item()) < 1e-4
    assert x.std().item() == pytest.approx(1.0, abs=1e-3)
    # Validation batches are scaled with the training statistics, not their own.
    train_x = dm.splits["train"][0].float() / 255
    mean, std = train_x.mean(), train_x.std()
    val_batch = next(iter(dm.val_dataloader()))
    x_val, y_val = dm.on_after_batch_transfer(val_batch, 0)
    torch.testing.assert_close(normalize(x_val), (val_batch[0].float() / 255 - mean) / std, rtol=1e-4, atol=1e-4)
    assert torch.equal(y_val, val_batch[1])


class CountingSamples(TensorSamples):
    single = batched = 0

    def __getitem__(self, i):
        CountingSamples.single += 1
        return super().__getitem__(i)

    def __getitems__(self, indices):
        CountingSamples.batched += 1
        return super().__getitems__(indices)


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.setattr(CountingSamples, "single", 0)
    monkeypatch.setattr(CountingSamples, "batched", 0)
    return CountingSamples


def test_dataloader_fetches_whole_batches(counting):
    x, y = unique_digits(100, 0)
    loader = DataLoader(counting(x, y), batch_size=16, collate_fn=already_stacked)
    got = list(loader)
    assert (counting.batched, counting.single) == (math.ceil(100 / 16), 0)
    assert [len(b[1]) for b in got] == [16] * 6 + [4]
    assert torch.equal(torch.cat([b[0] for b in got]), x)


def test_datamodule_loaders_fetch_whole_batches(data, monkeypatch, counting):
    monkeypatch.setattr(batches, "TensorSamples", counting)
    dm = make(data[0], batch_size=32)
    for name in ("train", "val", "test"):
        list(getattr(dm, f"{name}_dataloader")())
    expected = sum(math.ceil(n / 32) for n in (N_TRAIN - VAL, VAL, N_TEST))
    assert (counting.batched, counting.single) == (expected, 0)
