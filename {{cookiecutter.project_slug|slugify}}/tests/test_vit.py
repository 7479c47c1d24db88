"""The Vision Transformer backbone: its shape rules, its mistakes, and that it learns."""

import pytest
import torch
from conftest import SMALL, run_cli, synthetic_digits
from torch import nn

from {{ cookiecutter.package_name }}.errors import UserError
from {{ cookiecutter.package_name }}.models import Classifier
from {{ cookiecutter.package_name }}.models.nets import Block, ViT, build_backbone

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def test_vit_tokens_blocks_and_features():
    vit = build_backbone("vit", (3, 32, 24), width=48, depth=3, dropout=0.0, heads=6, patch_size=8)
    assert isinstance(vit, ViT) and vit.out_features == 48
    assert [type(b) for b in vit.blocks] == [Block] * 3
    assert [b.attention.num_heads for b in vit.blocks] == [6] * 3
    assert vit.position.shape == (1, (32 // 8) * (24 // 8), 48)  # one position per patch
    assert vit(torch.randn(5, 3, 32, 24)).shape == (5, 48)


def test_block_is_pre_norm_residual():
    """With its two branches silenced, a block is the identity: x + f(norm(x)) with f = 0."""
    block = Block(width=16, heads=2, dropout=0.0)
    x = torch.randn(2, 5, 16)
    assert not torch.allclose(block(x), x)
    for layer in (block.attention.out_proj, block.mlp[2]):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    assert torch.equal(block(x), x)


def test_position_embedding_tells_patches_apart():
    """Mean pooling alone would not care where a patch is; the position embedding makes it matter."""
    vit = ViT((1, 28, 28), width=32, depth=1, dropout=0.0, heads=4, patch_size=7).eval()
    x = torch.zeros(1, 1, 28, 28)
    moved = x.clone()
    x[..., :7, :7] = 1.0  # the same patch content, in two places
    moved[..., 7:14, 7:14] = 1.0
    with torch.no_grad():
        assert not torch.allclose(vit(x), vit(moved))
        vit.position.zero_()
        assert torch.allclose(vit(x), vit(moved), atol=1e-6)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"patch_size": 5}, ["28x28", "5x5 patches", "--model.patch_size", "[2, 4, 7, 14, 28]"]),
        ({"width": 50, "heads": 4}, ["width 50", "heads 4", "not divisible"]),
    ],
)
def test_vit_shape_mistakes_are_user_errors(options, words):
    args = {"width": 64, "heads": 4, "patch_size": 7, **options}
    with pytest.raises(UserError) as error:
        build_backbone("vit", (1, 28, 28), depth=1, dropout=0.0, **args)
    assert all(word in str(error.value) for word in words), str(error.value)


def test_vit_mistake_on_the_command_line_is_one_error_line(workdir, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli("fit", *SMALL, "--model.backbone=vit", "--model.patch_size=6")
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ERROR: backbone 'vit'") and "6x6 patches" in err[-1], err


def test_vit_learns_where_the_square_is():
    """The synthetic task needs attention and positions: which patch holds the bright square."""
    torch.manual_seed(0)
    x, y = synthetic_digits(600, 0)
    x, y = ((x.float() / 255 - 0.2) / 0.3)[:, None], y.long()
    model = Classifier(backbone="vit", width=32, depth=2, heads=4, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(400):
        i = torch.randint(0, 500, (32,))
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model.eval()(x[500:]).argmax(-1) == y[500:]).float().mean()
    assert accuracy >= 0.6  # chance is 0.1; 0.76 to 1.0 over seeds 0-5
