"""What every DataModule here shares: samples held in memory, fetched a batch at a time.

A plain PyTorch DataLoader asks the dataset for each sample, then stacks them with a
collate function: two Python calls and a copy per sample. `TensorSamples` answers the
DataLoader's batched request (`__getitems__`) with one indexing operation instead, so a
batch of 64 costs about what one sample would. Because it is still an ordinary
DataLoader, the Trainer can shard it across processes (DDP) without any code of ours.

Images stay uint8 until they reach the device; `on_after_batch_transfer` converts and
normalises each batch there, which moves a quarter of the bytes of float32.
"""

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError


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


def keep_batch(batch):
    """Collate function: `__getitems__` already returned a stacked batch."""
    return batch


def split_indices(n: int, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    """Shuffle range(n) with `seed` and cut it into parts of the given fractions, then the rest."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sizes = [round(n * f) for f in fractions]
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist() + [n]
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


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
        self.mean = self.std = None

    def set_splits(self, train, val, test) -> None:
        """Store the splits and the per-channel statistics of the training images."""
        self.splits = {"train": train, "val": val, "test": test}
        x = train[0].float()
        dims = [d for d in range(x.dim()) if d != 1] if x.dim() > 2 else [0]
        self.mean = x.mean(dim=dims, keepdim=True)[0]
        self.std = x.std(dim=dims, keepdim=True)[0].clamp_min(1e-6)

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if self.on_device and self.trainer is not None:
            # The whole split moves to the GPU once; batches are then cut out there and
            # nothing crosses the PCIe bus per step.
            device = self.trainer.strategy.root_device
            self.splits[split] = tuple(t.to(device) for t in self.splits[split])
        return DataLoader(
            TensorSamples(*self.splits[split]),
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=keep_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x.float() - self.mean) / self.std, y
