"""models/layers.py: per-image CPU kernels give an image the same bits alone and in any batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.adm import ADMUNet
from models.config import preset
from models.consistency import ConsistencyModel
from models.layers import Conv2d, Linear, linear, set_per_image
from tests.conftest import randomize
from tests.unit.models.test_adm import TINY_ADM

SIZES = (2, 3, 5, 8, 16, 24)


def assert_rows_as_alone(fn, x: torch.Tensor) -> None:
    """fn's rows for every prefix of x in SIZES are bitwise its rows computed one image at a time."""
    alone = torch.cat([fn(x[i : i + 1]) for i in range(x.shape[0])])
    for size in SIZES:
        assert torch.equal(fn(x[:size]), alone[:size]), size


@pytest.mark.parametrize("shape", [(24, 256), (24, 3, 64)])  # an embedding, and rows of tokens per image
def test_a_per_image_linear_is_the_same_alone_and_in_any_batch(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer = Linear(shape[-1], 1024)
    x = torch.randn(*shape)
    set_per_image(layer)
    assert_rows_as_alone(layer, x)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("cin", "cout", "kernel", "stride", "padding", "size"),
                         [(64, 64, 3, 1, 1, 8), (96, 64, 1, 1, 0, 16), (32, 32, 3, 2, 1, 16), (16, 16, 3, 1, 1, 24)])
def test_a_per_image_convolution_is_the_same_alone_and_in_any_batch(cin, cout, kernel, stride, padding, size) -> None:
    """Feature maps up to CHANNELS_LAST_PIXELS run channels-last, larger ones (24×24) contiguous."""
    torch.manual_seed(0)
    layer = Conv2d(cin, cout, kernel, stride=stride, padding=padding)
    x = torch.randn(24, cin, size, size)
    set_per_image(layer)
    assert_rows_as_alone(layer, x)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, stride, padding), rtol=0, atol=1e-5)


def test_without_per_image_the_layers_are_torchs() -> None:
    torch.manual_seed(0)
    conv, dense = Conv2d(8, 16, 3, padding=1), Linear(8, 16, bias=False)
    x = torch.randn(3, 8, 5, 5)
    assert torch.equal(conv(x), nn.Conv2d.forward(conv, x))
    assert torch.equal(dense(x[:, :, 0, 0]), F.linear(x[:, :, 0, 0], dense.weight))
    assert torch.equal(linear(x[:, :, 0, 0], dense.weight, None, per_image=False), dense(x[:, :, 0, 0]))
    assert set(conv.state_dict()) == set(nn.Conv2d(8, 16, 3).state_dict())  # checkpoints are unchanged


def test_set_per_image_switches_every_layer_and_back() -> None:
    model = ADMUNet(TINY_ADM)
    switchable = [m for m in model.modules() if hasattr(m, "per_image")]
    assert {type(m).__name__ for m in switchable} == {"Conv2d", "Linear", "AttentionBlock"}
    set_per_image(model)
    assert all(m.per_image for m in switchable)
    set_per_image(model, False)
    assert not any(m.per_image for m in switchable)


def test_a_convolution_without_a_per_image_kernel_is_refused() -> None:
    with pytest.raises(ValueError, match="no per-image CPU kernel"):
        set_per_image(nn.Sequential(Conv2d(4, 4, 3, groups=2)))
    set_per_image(nn.Sequential(Conv2d(4, 4, 3, groups=2)), False)  # switching off never refuses


@pytest.mark.parametrize("config", [preset("digits").replace(model_channels=32, num_groups=4), TINY_ADM],
                         ids=["ncsnpp", "adm"])
def test_a_per_image_network_gives_each_image_the_same_bits_alone_and_in_any_batch(config) -> None:
    torch.manual_seed(0)
    model = randomize(ConsistencyModel.from_config(config)).eval()
    set_per_image(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, *config.image_shape, generator=gen) * 5
    sigma = torch.exp(torch.randn(24, generator=gen))
    labels = torch.randint(config.num_classes, (24,), generator=gen) if config.num_classes else None

    def f(a: int, b: int) -> torch.Tensor:
        return model(x[a:b], sigma[a:b], None if labels is None else labels[a:b])

    with torch.inference_mode():
        alone = torch.cat([f(i, i + 1) for i in range(24)])
        for size in SIZES:
            assert torch.equal(f(0, size), alone[:size]), size
