"""The UNet backbone (models/unet.py): embeddings, blocks, shapes, and that images in a batch never mix."""

from __future__ import annotations

import math

import pytest
import torch

from models.config import preset
from models.unet import Attention, FourierEmbedding, PositionalEmbedding, UNet, zero_init
from tests.conftest import randomize


def test_positional_embedding_is_cos_then_sin_of_geometric_frequencies() -> None:
    emb = PositionalEmbedding(8)
    x = torch.tensor([0.0, 2.5])
    out = emb(x)
    freqs = torch.tensor([1e-4 ** (i / 4) for i in range(4)])
    assert out.shape == (2, 8)
    torch.testing.assert_close(out[:, :4], torch.cos(x[:, None] * freqs))
    torch.testing.assert_close(out[:, 4:], torch.sin(x[:, None] * freqs))


def test_fourier_embedding_uses_its_random_frequencies_times_two_pi() -> None:
    torch.manual_seed(0)
    emb = FourierEmbedding(6, scale=0.02)
    x = torch.tensor([1.0])
    angles = 2 * math.pi * emb.freqs
    torch.testing.assert_close(emb(x), torch.cat([angles.cos(), angles.sin()])[None])


def test_zero_init_makes_a_new_branch_the_identity() -> None:
    layer = zero_init(torch.nn.Conv2d(4, 4, 1))
    assert all(bool((p == 0).all()) for p in layer.parameters())
    attention = Attention(8, head_channels=4, num_groups=2)
    x = torch.randn(2, 8, 4, 4)
    assert bool((attention(x) == 0).all())  # its output projection starts at zero


@pytest.mark.parametrize("name", ["digits", "cifar10"])
def test_output_has_the_input_shape(name: str) -> None:
    cfg = preset(name).replace(model_channels=16, num_groups=4, num_res_blocks=1)
    net = UNet(cfg).eval()
    x = torch.randn(2, *cfg.image_shape)
    labels = torch.tensor([1, 2]) if cfg.num_classes else None
    assert net(x, torch.tensor([0.1, 2.0]), labels).shape == x.shape


def test_class_labels_are_required_exactly_for_conditional_models() -> None:
    cfg = preset("digits").replace(model_channels=16, num_groups=4)
    net = UNet(cfg)
    x = torch.randn(1, *cfg.image_shape)
    with pytest.raises(ValueError, match="class_labels are required"):
        net(x, torch.zeros(1))
    unconditional = UNet(cfg.replace(num_classes=0))
    with pytest.raises(ValueError, match="class_labels must be None"):
        unconditional(x, torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_each_image_is_computed_alone_whatever_else_is_in_the_batch() -> None:
    """Every operator is per image (GroupNorm, not BatchNorm): the basis of same seed, same image in any batch."""
    cfg = preset("digits").replace(model_channels=16, num_groups=4)
    net = randomize(UNet(cfg)).eval()
    x, c = torch.randn(5, *cfg.image_shape), torch.linspace(-1, 1, 5)
    labels = torch.arange(5)
    with torch.no_grad():
        batch = net(x, c, labels)
        alone = torch.cat([net(x[i : i + 1], c[i : i + 1], labels[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)


def test_attention_resolutions_place_attention_where_asked() -> None:
    cfg = preset("cifar10").replace(model_channels=16, num_groups=4, num_res_blocks=1)
    net = UNet(cfg)
    blocks = [m for m in net.enc if hasattr(m, "attn")]  # one residual block per level here
    with_attention = [cfg.image_size >> level for level, block in enumerate(blocks) if block.attn is not None]
    expected = [cfg.image_size >> level for level in range(len(cfg.channel_mult))
                if cfg.image_size >> level in cfg.attn_resolutions]
    assert with_attention == expected and expected
