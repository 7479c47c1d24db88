"""The networks, as plain `nn.Module`s built from plain arguments.

Each backbone maps a batch of inputs to feature vectors of size `out_features`; the
classifier puts one linear head on top. Keeping the head separate is what lets a
checkpoint be fine-tuned on data with a different number of classes.
"""

import math

import torch
from torch import nn

from ..errors import UserError


class Normalize(nn.Module):
    """`(x - mean) / std` with the training data's statistics: per channel for images (C, H, W),
    per feature for tables (F,).

    They are buffers, not parameters: the optimizer leaves them alone, yet every checkpoint
    saves them and every export contains them, so a trained model takes raw inputs (pixels in
    [0, 1], feature values as in the CSV) wherever it runs. `fit` sets them from the data
    (Classifier.setup); until then they are 0 and 1, which change nothing.
    """

    def __init__(self, input_shape):
        super().__init__()
        shape = (input_shape[0], *[1] * (len(input_shape) - 1))  # broadcasts over (batch, *input_shape)
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))

    @torch.no_grad()
    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean.reshape(self.mean.shape))
        self.std.copy_(std.reshape(self.std.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MLP(nn.Sequential):
    """Flatten, then `depth` x (Linear -> ReLU -> Dropout), all `width` wide."""

    def __init__(self, input_shape, width: int, depth: int, dropout: float):
        layers, size = [nn.Flatten()], math.prod(input_shape)
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.ReLU(), nn.Dropout(dropout)]
            size = width
        super().__init__(*layers)
        self.out_features = size


def check_images(backbone: str, input_shape) -> None:
    if len(input_shape) != 3:
        raise UserError(
            f"backbone '{backbone}' needs images (channels, height, width) but the data gives "
            f"samples of shape {tuple(input_shape)}; use --model.backbone=mlp"
        )


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    # No bias: BatchNorm's shift makes it redundant.
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class ConvNet(nn.Sequential):
    """`depth` blocks of two 3x3 convolutions, each block halving the resolution and
    doubling the channels (width, 2*width, ...), then global average pooling."""

    def __init__(self, input_shape, width: int, depth: int, dropout: float):
        check_images("cnn", input_shape)
        layers, c = [], input_shape[0]
        for i in range(depth):
            out = width * 2**i
            layers += [*conv_bn_relu(c, out), *conv_bn_relu(out, out), nn.MaxPool2d(2), nn.Dropout(dropout)]
            c = out
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = c


class LeNet(nn.Sequential):
    """LeNet's plan with today's layers: `depth` x (3x3 convolution -> BatchNorm -> ReLU -> 2x2
    max-pool), with width, 2*width, ... channels; then the last feature map, flattened, into a
    hidden layer of 8*width units. Flattening keeps where in the image each feature was, which
    global pooling (`cnn`) averages away: on small centred images such as Fashion-MNIST it is
    more accurate for less compute, but the network takes only images of the size it was built for."""

    def __init__(self, input_shape, width: int, depth: int, dropout: float):
        check_images("lenet", input_shape)
        (c, rows, columns), layers = input_shape, []
        if min(rows, columns) < 2**depth:
            raise UserError(f"backbone 'lenet': {rows}x{columns} images are too small for depth {depth} (2x2 pooling)")
        for i in range(depth):
            out = width * 2**i
            layers += [*conv_bn_relu(c, out), nn.MaxPool2d(2)]
            c, rows, columns = out, rows // 2, columns // 2
        hidden = 8 * width
        dense = [nn.Flatten(), nn.Dropout(dropout), nn.Linear(c * rows * columns, hidden), nn.ReLU()]
        super().__init__(*layers, *dense, nn.Dropout(dropout))
        self.out_features = hidden


class Block(nn.Module):
    """A pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x)).

    FSDP shards and checkpoints the network one `Block` at a time (configs/trainer/fsdp.yaml).
    """

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A Vision Transformer: cut the image into `patch_size` squares, embed each as a
    `width`-long token, add a learned position embedding, run `depth` blocks of `heads`
    attention heads, and average the tokens."""

    def __init__(self, input_shape, width: int, depth: int, dropout: float, heads: int = 4, patch_size: int = 7):
        check_images("vit", input_shape)
        channels, rows, columns = input_shape
        if rows % patch_size or columns % patch_size:
            fits = [p for p in range(2, min(rows, columns) + 1) if rows % p == 0 and columns % p == 0]
            raise UserError(
                f"backbone 'vit': images of {rows}x{columns} pixels do not divide into {patch_size}x{patch_size} "
                f"patches; set --model.patch_size to one of {fits or [1]}"
            )
        if width % heads:
            raise UserError(
                f"backbone 'vit': width {width} is not divisible by heads {heads}; each head gets width/heads "
                "features (e.g. --model.width=128 --model.heads=4)"
            )
        super().__init__()
        self.patches = nn.Conv2d(channels, width, patch_size, stride=patch_size)  # one token per patch
        tokens = (rows // patch_size) * (columns // patch_size)
        self.position = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.blocks = nn.Sequential(*(Block(width, heads, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patches(x).flatten(2).transpose(1, 2) + self.position  # (batch, tokens, width)
        return self.norm(self.blocks(x)).mean(dim=1)


BACKBONES = {"mlp": MLP, "cnn": ConvNet, "lenet": LeNet, "vit": ViT}
WEIGHT_DTYPES = {"64-true": torch.float64, "16-true": torch.float16, "bf16-true": torch.bfloat16}


def example_batch(input_shape, precision: str = "32-true") -> torch.Tensor:
    """One zero sample of `input_shape`, as a batch of 1, in the weights' dtype under `precision`.

    A LightningModule that sets it as `example_input_array` gets each layer's input and output
    shapes and FLOPs (per sample) in the model summary. Models of other inputs set their own
    (a text model: token ids of shape (1, length)).
    """
    return torch.zeros(1, *input_shape, dtype=WEIGHT_DTYPES.get(str(precision), torch.float32))


def build_backbone(
    name: str, input_shape, width: int, depth: int, dropout: float, heads: int = 4, patch_size: int = 7
) -> nn.Module:
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    extra = {"heads": heads, "patch_size": patch_size} if name == "vit" else {}
    return BACKBONES[name](tuple(input_shape), width, depth, dropout, **extra)


def own_network(network, input_shape, num_classes: int) -> nn.Module:
    """A user's network (README, "Bring your own network"), checked on one example batch.

    `network` is a ready `nn.Module`, or a class or function that builds one when called as
    `network(input_shape, num_classes)` (the data's input shape and the number of outputs: 1 for a
    regression). Every LightningModule of the project builds its injected network here.

    A network whose first layer is an `nn.Linear` (a tutorial's MLP) is given flat inputs:
    images of (channels, height, width) are flattened first, as the built-in MLP does.
    """
    if not isinstance(network, nn.Module):
        network = network(tuple(input_shape), num_classes)
    first = next((m for m in network.modules() if not list(m.children())), None)
    if isinstance(first, nn.Linear) and len(input_shape) > 1:
        network = nn.Sequential(nn.Flatten(), network)
    name = type(network[-1] if isinstance(network, nn.Sequential) else network).__name__
    shape = ", ".join(map(str, input_shape))
    training = network.training
    try:
        with torch.no_grad():  # in eval mode: BatchNorm's running statistics stay as they are
            out = network.eval()(example_batch(input_shape).expand(2, *input_shape))
    except Exception as err:  # the user's code: any error means it does not take this data's batches
        raise UserError(
            f"model.network {name}: fails on a batch of this data's inputs, shape (batch, {shape}) "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); match its input size to the data"
        ) from None
    network.train(training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(
            f"model.network {name}: returns {got} for a batch of 2, not (2, {num_classes}): "
            f"its last layer must give {num_classes} outputs per sample (a classifier: one logit per class; "
            "a regressor: one value)"
        )
    return network


def output_network(network: nn.Module | None, input_shape, outputs: int, width: int, depth: int, dropout: float):
    """A network from inputs to `outputs` values: your own (checked by `own_network`), or the MLP
    with a linear output layer (the Regressor's; a table's features need no other backbone)."""
    if network is not None:
        return own_network(network, input_shape, outputs)
    body = MLP(tuple(input_shape), width, depth, dropout)
    return nn.Sequential(body, nn.Linear(body.out_features, outputs))
