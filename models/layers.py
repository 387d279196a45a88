"""Convolution and linear layers that can compute every image of a CPU batch with the same kernels.

The same seed must give the same image whatever else is in its batch. On the CPU, oneDNN's convolutions and
the BLAS's small matrix products pick their kernels, and so their order of summation, by batch size: on an AVX2
EPYC a 64×64 model's f moved by ~4e-6 between an image alone and in a batch, enough to move one uint8 level in
a third of the images. With `per_image` set, a layer on the CPU computes each image by one product of the same
shape whatever the batch: ATen's own convolution (an image-by-image GEMM) and a batched matrix product with one
matrix per image. Both are bit-identical alone and in any batch; state dicts are those of `nn.Conv2d` and
`nn.Linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Per-image convolutions of feature maps up to this many pixels run channels-last (each image's GEMM then has its
# pixels as rows, which suits small maps); on larger maps channels-last was no faster, so they stay contiguous.
CHANNELS_LAST_PIXELS = 256


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, per_image: bool) -> torch.Tensor:
    """F.linear over x's last dimension; with `per_image` on the CPU, one product per image (x: (B, ..., K))."""
    if not (per_image and x.device.type == "cpu"):
        return F.linear(x, weight, bias)
    b = x.shape[0]
    rows = torch.bmm(x.reshape(b, -1, x.shape[-1]), weight.t().expand(b, -1, -1))  # (B, rows of an image, N)
    if bias is not None:
        rows = rows + bias
    return rows.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    per_image = False  # set by set_per_image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.per_image)


class Conv2d(nn.Conv2d):
    per_image = False  # set by set_per_image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_image and x.device.type == "cpu":
            if x.shape[-2] * x.shape[-1] <= CHANNELS_LAST_PIXELS:
                x = x.contiguous(memory_format=torch.channels_last)
            return torch._C._nn.thnn_conv2d(x, self.weight, self.kernel_size, self.bias, self.stride, self.padding)
        return super().forward(x)


def plain(conv: nn.Conv2d) -> bool:
    """Whether ATen's image-by-image convolution (thnn_conv2d) computes this layer: no groups, dilation or
    padding other than numbers of zeros."""
    return (conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def set_per_image(model: nn.Module, on: bool = True) -> None:
    """Switch every layer of `model` that has `per_image` (these layers, attention blocks) to it, or back."""
    for module in model.modules():
        if on and isinstance(module, Conv2d) and not plain(module):
            raise ValueError(f"no per-image CPU kernel for {module}")
        if hasattr(module, "per_image"):
            module.per_image = on
