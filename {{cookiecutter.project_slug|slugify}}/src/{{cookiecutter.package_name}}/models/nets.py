"""The networks, as plain `nn.Module`s built from plain arguments.

Each backbone maps a batch of inputs to feature vectors of size `out_features`; the
classifier puts one linear head on top. Keeping the head separate is what lets a
checkpoint be fine-tuned on data with a different number of classes.
"""

import math

from torch import nn

from ..errors import UserError


class MLP(nn.Sequential):
    """Flatten, then `depth` x (Linear -> ReLU -> Dropout), all `width` wide."""

    def __init__(self, input_shape, width: int, depth: int, dropout: float):
        layers, size = [nn.Flatten()], math.prod(input_shape)
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.ReLU(), nn.Dropout(dropout)]
            size = width
        super().__init__(*layers)
        self.out_features = size


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    # No bias: BatchNorm's shift makes it redundant.
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class ConvNet(nn.Sequential):
    """`depth` blocks of two 3x3 convolutions, each block halving the resolution and
    doubling the channels (width, 2*width, ...), then global average pooling."""

    def __init__(self, input_shape, width: int, depth: int, dropout: float):
        if len(input_shape) != 3:
            raise UserError(
                f"backbone 'cnn' needs images (channels, height, width) but the data gives "
                f"samples of shape {tuple(input_shape)}; use --model.backbone=mlp"
            )
        layers, c = [], input_shape[0]
        for i in range(depth):
            out = width * 2**i
            layers += [*conv_bn_relu(c, out), *conv_bn_relu(out, out), nn.MaxPool2d(2), nn.Dropout(dropout)]
            c = out
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = c


BACKBONES = {"mlp": MLP, "cnn": ConvNet}


def build_backbone(name: str, input_shape, width: int, depth: int, dropout: float) -> nn.Module:
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](tuple(input_shape), width, depth, dropout)
