"""Data augmentation for images, on whole batches, on the device that trains.

Each training batch (N x C x H x W, pixels in [0, 1]) can be shifted by up to `translate` pixels
(a random crop of the image padded with black), mirrored left to right with probability 1/2
(`flip`), and have one random rectangle blacked out with probability `erase` (random erasing).
Every choice for the whole batch is drawn at once with tensor operations: no Python per sample.

The random numbers come from a generator seeded by (shuffle seed, epoch, batch, process), not
from the global one: a run resumed mid-epoch augments each batch exactly as the uninterrupted
run did, and dropout's random numbers are the same with and without augmentation.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import UserError


class Augmentation(NamedTuple):
    translate: int = 0  # the largest shift, in pixels, in each direction
    flip: bool = False  # mirror left to right half of the time
    erase: float = 0.0  # the chance that one rectangle (1/8 to 1/2 of each side) is blacked out

    @property
    def active(self) -> bool:
        return bool(self.translate or self.flip or self.erase)

    def check(self, input_shape: tuple[int, ...]) -> None:
        """A UserError for settings that cannot apply to samples of `input_shape`."""
        if not self.active:
            return
        if len(input_shape) != 3:
            raise UserError(f"translate, flip and erase augment images; these samples have shape {input_shape}")
        if not 0 <= self.translate < min(input_shape[1:]) // 2:
            raise UserError(
                f"translate={self.translate} must be from 0 to {min(input_shape[1:]) // 2 - 1} pixels for "
                f"{input_shape[1]}x{input_shape[2]} images"
            )
        if not 0 <= self.erase <= 1:
            raise UserError(f"erase={self.erase} is a probability: give a number from 0 to 1")


def batch_generator(device: torch.device, *seeds: int) -> torch.Generator:
    """A generator on `device` whose numbers depend only on `seeds`."""
    return torch.Generator(device=device).manual_seed(hash(seeds) % 2**63)


def augment(x: torch.Tensor, how: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """`x` (N x C x H x W, in [0, 1]) with `how` applied, each image its own draw."""
    n, c, h, w = x.shape
    device = x.device

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=device, generator=generator)

    if how.translate:
        p = how.translate
        padded = F.pad(x, (p, p, p, p))
        top, left = (uniform(2, n, 1) * (2 * p + 1)).long().clamp_max(2 * p)  # each image's crop
        rows = (top + torch.arange(h, device=device))[:, None, :, None]
        columns = (left + torch.arange(w, device=device))[:, None, None, :]
        images = torch.arange(n, device=device)[:, None, None, None]
        x = padded[images, torch.arange(c, device=device)[None, :, None, None], rows, columns]
    if how.flip:
        x = torch.where(uniform(n)[:, None, None, None] < 0.5, x.flip(-1), x)
    if how.erase:
        # A rectangle with sides from 1/8 to 1/2 of the image's, at a random place, in each image
        # picked with probability `erase`.
        heights = h // 8 + (uniform(n) * (h // 2 - h // 8 + 1)).long()
        widths = w // 8 + (uniform(n) * (w // 2 - w // 8 + 1)).long()
        tops = (uniform(n) * (h - heights + 1)).long()
        lefts = (uniform(n) * (w - widths + 1)).long()
        y = torch.arange(h, device=device)[None, :, None]
        z = torch.arange(w, device=device)[None, None, :]
        inside_rows = (y >= tops[:, None, None]) & (y < (tops + heights)[:, None, None])  # N x H x 1
        inside_columns = (z >= lefts[:, None, None]) & (z < (lefts + widths)[:, None, None])  # N x 1 x W
        box = inside_rows & inside_columns & (uniform(n) < how.erase)[:, None, None]
        x = x.masked_fill(box[:, None], 0.0)
    return x
