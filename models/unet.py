"""The backbone F_θ: a UNet of the EDM / NCSN++ / ADM family.

Residual blocks (GroupNorm, SiLU, adaptive scale-shift from the noise/class embedding, dropout),
self-attention at chosen resolutions, Fourier (NCSN++) or positional (ADM) noise embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import Conv2d, Linear

SKIP_SCALE = 1 / math.sqrt(2)  # NCSN++ residual scaling keeps activations at unit variance


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(num_groups, channels // 4) or 1, channels, eps=1e-6)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so that a new residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def add_augment_labels(
    noise_emb: torch.Tensor, layer: nn.Module | None, augment_labels: torch.Tensor | None
) -> torch.Tensor:
    """noise_emb + layer(augment_labels) (EDM's map_augment); None labels mean no augmentation, i.e. zeros."""
    if augment_labels is None:
        return noise_emb
    if layer is None:
        raise ValueError("this model has no augmentation input (augment_dim 0): augment_labels must be None")
    return noise_emb + layer(augment_labels.to(noise_emb.dtype))


class FourierEmbedding(nn.Module):
    """Random Fourier features of c_noise (NCSN++); iCT §3.2 sets the scale to 0.02."""

    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, channels)
        x = x.to(self.freqs.dtype).outer(2 * math.pi * self.freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of c_noise (ADM / DDPM)."""

    def __init__(self, channels: int, max_positions: int = 10000) -> None:
        super().__init__()
        half = channels // 2
        freqs = (1 / max_positions) ** (torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, channels)
        x = x.to(self.freqs.dtype).outer(self.freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, as a residual branch."""

    def __init__(self, channels: int, head_channels: int, num_groups: int) -> None:
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = group_norm(channels, num_groups)
        self.qkv = Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, c/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, c/heads)
        return self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class ResBlock(nn.Module):
    """GN-SiLU-conv, adaptive scale/shift from the embedding, GN-SiLU-dropout-conv, skip."""

    def __init__(self, cin: int, cout: int, emb_ch: int, cfg: ModelConfig, attention: bool) -> None:
        super().__init__()
        self.norm0 = group_norm(cin, cfg.num_groups)
        self.conv0 = Conv2d(cin, cout, 3, padding=1)
        self.affine = Linear(emb_ch, 2 * cout)
        self.norm1 = group_norm(cout, cfg.num_groups)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv1 = zero_init(Conv2d(cout, cout, 3, padding=1))
        self.skip = Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = Attention(cout, cfg.head_channels, cfg.num_groups) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)  # each (B, cout, 1, 1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        x = (h + self.skip(x)) * SKIP_SCALE
        if self.attn is not None:
            x = (x + self.attn(x)) * SKIP_SCALE
        return x


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """F_θ(x, c_noise, class_labels): the raw network inside the consistency parameterization."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        emb_ch = cfg.emb_mult * mc
        if cfg.embedding == "fourier":
            self.noise_emb: nn.Module = FourierEmbedding(mc, cfg.fourier_scale)
        else:
            self.noise_emb = PositionalEmbedding(mc)
        self.map0 = Linear(mc, emb_ch)
        self.label_emb = nn.Embedding(cfg.num_classes, emb_ch) if cfg.num_classes else None
        self.map1 = Linear(emb_ch, emb_ch)

        # Encoder: each level's blocks, then a downsample to the next level.
        ch = mc * cfg.channel_mult[0]
        self.conv_in = Conv2d(cfg.image_channels, ch, 3, padding=1)
        self.enc = nn.ModuleList()
        skip_chs = [ch]
        for level, mult in enumerate(cfg.channel_mult):
            res = cfg.image_size >> level
            if level > 0:
                self.enc.append(Downsample(ch))
                skip_chs.append(ch)
            for _ in range(cfg.num_res_blocks):
                self.enc.append(ResBlock(ch, mc * mult, emb_ch, cfg, res in cfg.attn_resolutions))
                ch = mc * mult
                skip_chs.append(ch)

        # Middle: two blocks at the lowest resolution, attention if that resolution asks for it.
        low_res = cfg.image_size >> (len(cfg.channel_mult) - 1)
        self.mid = nn.ModuleList(
            [
                ResBlock(ch, ch, emb_ch, cfg, low_res in cfg.attn_resolutions),
                ResBlock(ch, ch, emb_ch, cfg, False),
            ]
        )

        # Decoder: one block more per level than the encoder, each eating one skip connection.
        self.dec = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            res = cfg.image_size >> level
            for _ in range(cfg.num_res_blocks + 1):
                cout = mc * cfg.channel_mult[level]
                self.dec.append(ResBlock(ch + skip_chs.pop(), cout, emb_ch, cfg, res in cfg.attn_resolutions))
                ch = cout
            if level > 0:
                self.dec.append(Upsample(ch))
        assert not skip_chs

        self.norm_out = group_norm(ch, cfg.num_groups)
        self.conv_out = zero_init(Conv2d(ch, cfg.image_channels, 3, padding=1))
        # EDM's augmentation labels, added to the noise embedding; made last so that the other layers draw the
        # same initial weights as without it, and zero so that it starts as a no-op.
        self.augment_emb = zero_init(Linear(cfg.augment_dim, mc, bias=False)) if cfg.augment_dim else None

    def embed(
        self, c_noise: torch.Tensor, class_labels: torch.Tensor | None, augment_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        noise = add_augment_labels(self.noise_emb(c_noise), self.augment_emb, augment_labels)  # (B, mc)
        emb = F.silu(self.map0(noise))  # (B, emb_ch)
        if self.label_emb is not None:
            if class_labels is None:
                raise ValueError("this model is class-conditional: class_labels are required")
            emb = emb + self.label_emb(class_labels)
        elif class_labels is not None:
            raise ValueError("this model is unconditional: class_labels must be None")
        return F.silu(self.map1(emb))

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,  # (B, augment_dim); None = no augmentation (sampling)
    ) -> torch.Tensor:
        emb = self.embed(c_noise, class_labels, augment_labels)
        h = self.conv_in(x)
        skips = [h]
        for block in self.enc:
            h = block(h, emb)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.dec:
            if isinstance(block, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))
