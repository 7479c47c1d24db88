"""What every DataModule here shares: samples held in memory, fetched a batch at a time.

A plain PyTorch DataLoader asks the dataset for each sample, then stacks them with a
collate function: two Python calls and a copy per sample. `TensorSamples` answers the
DataLoader's batched request (`__getitems__`) with one indexing operation instead, so a
batch of 64 costs about what one sample would. Because it is still an ordinary
DataLoader, the Trainer can shard it across processes (DDP) without any code of ours.

Images stay uint8 until they reach the device; `on_after_batch_transfer` turns each batch
into floats there (pixels / 255, in [0, 1]), which moves a quarter of the bytes of float32,
and augments training batches there when asked (augment.py).
The normalisation with the training split's mean and std is the model's first layer, not
the data's: the statistics are computed here (`set_splits`), the model copies them when `fit`
starts, and its checkpoints and exports carry them.
"""

from typing import NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import UserError
from .augment import Augmentation, augment, batch_generator


class TensorSamples(Dataset):
    """Samples `x[i]` with labels `y[i]`, indexed a whole batch at once."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]):
        index = torch.as_tensor(indices, device=self.x.device)
        return self.x[index], self.y[index]


class EpochSampler(Sampler[int]):
    """Shuffles range(n) anew each epoch, in an order fixed by (seed, epoch), so that a run
    resumed mid-epoch (`fit --ckpt_path=last`) can skip what it had already trained on."""

    def __init__(self, n: int, seed: int, skip: dict[int, int]):
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, skip  # skip: {epoch: samples to leave out}

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this before each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n  # the whole epoch: Lightning counts the skipped batches as done

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        skip = self.skip.pop(self.epoch, 0)
        self.epoch += 1  # the next epoch, unless set_epoch says otherwise
        return iter(order[skip:].tolist())


def already_stacked(batch):
    """Collate function: `__getitems__` already returned a stacked batch."""
    return batch


def split_indices(n: int, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    """Shuffle range(n) with `seed` and cut it into parts of the given fractions, then the rest."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sizes = [round(n * f) for f in fractions]
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist() + [n]
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def labelled_subset(
    y: torch.Tensor, samples_per_class: int | None, fraction: float, seed: int, class_names: list[str]
) -> torch.Tensor:
    """Indices of a reproducible, class-balanced part of labels `y`, in their original order:
    `samples_per_class` of each class, or `fraction` of each class (at least one)."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for k in range(len(class_names)):
        members = (y == k).nonzero().flatten()
        n = samples_per_class if samples_per_class is not None else max(1, round(fraction * len(members)))
        if n > len(members):
            raise UserError(
                f"samples_per_class={samples_per_class}: class {class_names[k]!r} has only {len(members)} "
                "training samples; lower --data.samples_per_class or use --data.train_fraction"
            )
        keep.append(members[torch.randperm(len(members), generator=g)[:n]])
    return torch.cat(keep).sort().values


class TrainingSubset(NamedTuple):
    """Which part of the training split to keep (`limit_training`); the default keeps all of it."""

    samples_per_class: int | None = None
    fraction: float = 1.0
    seed: int = 0


def model_input(x: torch.Tensor) -> torch.Tensor:
    """What the model is given: uint8 pixels as floats in [0, 1], any other values as float32."""
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


class InMemoryDataModule(L.LightningDataModule):
    """Base class: subclasses fill `self.splits` in `setup` with (x, y) tensors per split.

    Subclasses also provide `num_classes`, `input_shape` and `class_names`, which the
    command line links into the model, so a user never types them twice.
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0, on_device: bool = False):
        super().__init__()
        if on_device and num_workers:
            raise UserError("on_device=true needs num_workers=0: worker processes cannot share GPU tensors")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.on_device = on_device
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.ids: dict[str, list[str]] = {}  # a name per sample (file, line) where a split has one
        self.mean = self.std = None  # of the training split's model inputs, per channel or feature
        self.target_mean = self.target_std = None  # of the training split's numeric targets (regression)
        self.unknown_label = -1  # the label of samples to predict (regression: NaN)
        self.trained = None  # the checkpoint's model settings, for test/predict (use_trained)
        self.training_subset = TrainingSubset()  # set by limit_training
        self.shuffle_seed, self.resume_at, self.restored_seed = None, {}, None  # see state_dict
        self.augmentation = Augmentation()  # off; image DataModules set it (augment.py)
        self.augmented = (None, 0)  # (epoch, training batches augmented in it so far)

    def limit_training(self, samples_per_class: int | None, train_fraction: float, seed: int) -> None:
        """Keep only part of the training split (fine-tuning with few labels); val and test stay whole."""
        if samples_per_class is not None and samples_per_class < 1:
            raise UserError(f"samples_per_class={samples_per_class} must be at least 1 (or null: all samples)")
        if not 0 < train_fraction <= 1:
            raise UserError(f"train_fraction={train_fraction} must be in (0, 1]; 1 keeps every training sample")
        self.training_subset = TrainingSubset(samples_per_class, train_fraction, seed)

    def set_splits(self, train, val, test) -> None:
        """Store the splits and the per-channel (per-feature) statistics of the training inputs."""
        subset = self.training_subset
        if subset.samples_per_class is not None or subset.fraction < 1:
            index = labelled_subset(train[1], *subset, self.class_names)
            train = (train[0][index], train[1][index])
        self.splits = {"train": train, "val": val, "test": test}
        self.augmentation.check(tuple(train[0].shape[1:]))
        x = model_input(train[0])
        dims = [d for d in range(x.dim()) if d != 1] if x.dim() > 2 else [0]
        self.mean = x.mean(dim=dims, keepdim=True)[0]
        self.std = x.std(dim=dims, keepdim=True)[0].clamp_min(1e-6)
        if train[1].is_floating_point():  # a number to predict: the model standardises it with these
            self.target_mean, self.target_std = train[1].mean(), train[1].std().clamp_min(1e-6)

    def use_trained(self, model_args: dict) -> None:
        """Before `test` or `predict` from a checkpoint (the CLI calls it): the settings the model was
        trained with (class_names, input_shape, feature_names), which take precedence over the files'."""
        self.trained = {k: model_args.get(k) for k in ("class_names", "input_shape", "feature_names")}

    @property
    def feature_names(self) -> list[str] | None:
        """A table's feature columns in the model's order; None for images."""
        return None

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if self.on_device and self.trainer is not None:
            # The whole split moves to the GPU once; batches are then cut out there and
            # nothing crosses the PCIe bus per step.
            device = self.trainer.strategy.root_device
            self.splits[split] = tuple(t.to(device) for t in self.splits[split])
        samples = TensorSamples(*self.splits[split])
        return DataLoader(
            samples,
            batch_size=self.batch_size,
            sampler=self._epoch_sampler(len(samples)) if shuffle else None,
            # Its own generator: making a loader then draws nothing from the global one, which
            # dropout uses, so a resumed run's random numbers match an uninterrupted run's.
            generator=torch.Generator().manual_seed(0),
            collate_fn=already_stacked,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _epoch_sampler(self, n: int) -> EpochSampler:
        # The global seed (seed_everything) picks the orders; a resumed run keeps its checkpoint's.
        self.shuffle_seed = torch.initial_seed() % 2**32 if self.restored_seed is None else self.restored_seed
        # Skipping is for one process; under DDP Lightning shards the sampler's full epoch.
        resumed = self.resume_at if self.trainer is None or self.trainer.world_size == 1 else {}
        # The batches already trained in a resumed epoch: the augmentation's draws go on after them.
        self.augmented = next(((epoch, done // self.batch_size) for epoch, done in resumed.items()), (None, 0))
        return EpochSampler(n, self.shuffle_seed, resumed)

    def state_dict(self) -> dict:
        """Saved in checkpoints: the shuffle seed and how far into the epoch training got."""
        loop = self.trainer.fit_loop if self.trainer is not None else None
        if loop is None or self.shuffle_seed is None:
            return {}
        # `completed` epochs: the one being trained (its batches may all be done: saved at its end).
        epoch, done = loop.epoch_progress.current.completed, loop.epoch_loop.batch_progress.current.processed
        return {"shuffle_seed": self.shuffle_seed, "epoch": epoch, "samples": done * self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.restored_seed, self.resume_at = state["shuffle_seed"], {state["epoch"]: state["samples"]}

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    @property
    def predict_split(self) -> str:
        """What `predict` runs on: the 'predict' split where a subclass has one (labels -1), else 'test'."""
        return "predict" if "predict" in self.splits else "test"

    def sample_ids(self, split: str) -> list[str]:
        """How the prediction CSV names each sample of `split`: `self.ids`, or else its index."""
        return self.ids.get(split) or [str(i) for i in range(len(self.splits[split][1]))]

    def read_predict(self) -> tuple[torch.Tensor, list[str]] | None:
        """Unlabelled samples to predict instead of the test split, with their ids; None: the test split."""
        return None

    def load_predict(self) -> bool:
        """Read the samples of `read_predict` into a 'predict' split (labels `unknown_label`); False if none."""
        if "predict" not in self.splits and (found := self.read_predict()) is not None:
            x, self.ids["predict"] = found
            self.splits["predict"] = (x, torch.full((len(x),), self.unknown_label))
        return "predict" in self.splits

    def predict_dataloader(self) -> DataLoader:
        self.load_predict()
        return self._loader(self.predict_split)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, torch.Tensor):  # the model summary's example input: already the network's input
            return batch
        x, y = batch
        x = model_input(x)
        if self.augmentation.active and self.trainer is not None and self.trainer.training:
            epoch, done = self.augmented
            if epoch != self.trainer.current_epoch:
                epoch, done = self.trainer.current_epoch, 0
            self.augmented = (epoch, done + 1)
            generator = batch_generator(x.device, self.shuffle_seed, epoch, done, self.trainer.global_rank)
            x = augment(x, self.augmentation, generator)
        if self.trainer is not None:  # precision bf16-true, 16-true, 64-true: the weights' dtype (Lightning
            x = self.trainer.precision_plugin.convert_input(x)  # converted only float batches; ours were uint8)
        return x, y
