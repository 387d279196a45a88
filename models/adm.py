"""The ADM backbone (guided-diffusion's UNet as openai/consistency_models configures it), for its checkpoints.

Module names and tensor shapes are those of `cm/unet.py`, so an OpenAI state dict loads key for key:
`time_embed`, `label_emb`, `input_blocks`, `middle_block`, `output_blocks`, `out`. What the released models
were trained with, and what differs from models/unet.py: GroupNorm with eps 1e-5 computed in fp32, no 1/√2 on
residual sums, up/down sampling inside residual blocks (nearest / 2×2 average, no convolution), attention with
a fixed 64 channels per head whose qkv projection is laid out (three, heads, channels), attention in the middle
block whatever its resolution, the positional embedding of c_noise with cos first, the class embedding added
to the time embedding after its MLP, and one output per channel (no learned variance).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import Conv2d, Linear, linear
from .unet import add_augment_labels

NORM_EPS = 1e-5  # cm/nn.py normalization(): GroupNorm32(32, channels), torch's default eps
MAX_PERIOD = 10000  # cm/nn.py timestep_embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back (cm/nn.py GroupNorm32), so bf16/fp16 serving keeps its statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def timestep_embedding(t: torch.Tensor, channels: int) -> torch.Tensor:
    """Sinusoidal embedding, cos first, frequencies exp(-ln(10⁴)·i/half) (cm/nn.py; diffusers flip_sin_to_cos)."""
    half = channels // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, channels)


class ResBlock(nn.Module):
    """in_layers (GN, SiLU, conv), optional up/down of both paths, embedding (scale/shift or add), out_layers, skip."""

    def __init__(self, cin: int, cout: int, emb_ch: int, cfg: ModelConfig, resample: str | None = None) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(cfg.num_groups, cin, eps=NORM_EPS), nn.SiLU(), Conv2d(cin, cout, 3, padding=1)
        )
        self.resample = resample  # None, "up" (nearest ×2) or "down" (2×2 average), applied before in_layers' conv
        self.scale_shift = cfg.scale_shift_norm
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_ch, 2 * cout if self.scale_shift else cout))
        self.out_layers = nn.Sequential(
            GroupNorm32(cfg.num_groups, cout, eps=NORM_EPS),
            nn.SiLU(),
            nn.Dropout(cfg.dropout),
            Conv2d(cout, cout, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if cin == cout else Conv2d(cin, cout, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers[2](self._resample(self.in_layers[1](self.in_layers[0](x))))
        x = self._resample(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (B, 2·cout or cout, 1, 1)
        if self.scale_shift:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over pixels, residual; qkv rows are (three, heads, head_channels), as cm/unet.py's flash path."""

    per_image = False  # layers.set_per_image: the projections one image at a time on the CPU

    def __init__(self, channels: int, cfg: ModelConfig) -> None:
        super().__init__()
        if channels % cfg.head_channels:
            raise ValueError(f"attention channels {channels} are not a multiple of head_channels {cfg.head_channels}")
        self.heads = channels // cfg.head_channels
        self.norm = GroupNorm32(cfg.num_groups, channels, eps=NORM_EPS)
        self.qkv = Conv2d(channels, 3 * channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # The 1×1 convolutions as matmuls over pixel rows, so that q, k, v come out with contiguous head channels:
        # SDPA then takes its fused kernels (a strided layout falls back to the slow math path, ~3× on CPU).
        tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        qkv = linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias, self.per_image)  # (B, HW, 3C)
        qkv = qkv.reshape(b, h * w, 3, self.heads, c // self.heads)  # split in three first, then heads
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, HW, c/heads)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)  # (B, HW, C)
        out = linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias, self.per_image)  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class TimestepSequential(nn.Sequential):
    """cm/unet.py's TimestepEmbedSequential: residual blocks get the embedding, other layers only x."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ADMUNet(nn.Module):
    """F_θ(x, c_noise, class_labels) of the consistency-models checkpoints."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        emb_ch = cfg.emb_mult * mc
        self.time_embed = nn.Sequential(Linear(mc, emb_ch), nn.SiLU(), Linear(emb_ch, emb_ch))
        if cfg.num_classes:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_ch)

        ch = mc * cfg.channel_mult[0]
        self.input_blocks = nn.ModuleList([TimestepSequential(Conv2d(cfg.image_channels, ch, 3, padding=1))])
        skip_chs = [ch]
        levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            attention = (cfg.image_size >> level) in cfg.attn_resolutions
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, mc * mult, emb_ch, cfg)]
                ch = mc * mult
                if attention:
                    layers.append(AttentionBlock(ch, cfg))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_chs.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepSequential(ResBlock(ch, ch, emb_ch, cfg, resample="down")))
                skip_chs.append(ch)

        self.middle_block = TimestepSequential(
            ResBlock(ch, ch, emb_ch, cfg), AttentionBlock(ch, cfg), ResBlock(ch, ch, emb_ch, cfg)
        )

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            attention = (cfg.image_size >> level) in cfg.attn_resolutions
            for i in range(cfg.num_res_blocks + 1):
                cout = mc * cfg.channel_mult[level]
                layers = [ResBlock(ch + skip_chs.pop(), cout, emb_ch, cfg)]
                ch = cout
                if attention:
                    layers.append(AttentionBlock(ch, cfg))
                if level and i == cfg.num_res_blocks:
                    layers.append(ResBlock(ch, ch, emb_ch, cfg, resample="up"))
                self.output_blocks.append(TimestepSequential(*layers))
        assert not skip_chs

        self.out = nn.Sequential(
            GroupNorm32(cfg.num_groups, ch, eps=NORM_EPS), nn.SiLU(), Conv2d(ch, cfg.image_channels, 3, padding=1)
        )
        # EDM's augmentation labels (not in OpenAI's checkpoints, which have augment_dim 0), added to the noise
        # embedding; bias-free and zero, so that it starts as a no-op.
        if cfg.augment_dim:
            self.augment_emb = Linear(cfg.augment_dim, mc, bias=False)
            nn.init.zeros_(self.augment_emb.weight)
        else:
            self.augment_emb = None

    def embed(
        self, c_noise: torch.Tensor, class_labels: torch.Tensor | None, augment_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        noise = timestep_embedding(c_noise, self.cfg.model_channels).to(self.time_embed[0].weight.dtype)  # (B, mc)
        emb = self.time_embed(add_augment_labels(noise, self.augment_emb, augment_labels))
        if self.cfg.num_classes:
            if class_labels is None:
                raise ValueError("this model is class-conditional: class_labels are required")
            emb = emb + self.label_emb(class_labels)
        elif class_labels is not None:
            raise ValueError("this model is unconditional: class_labels must be None")
        return emb  # (B, emb_ch)

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,  # (B, augment_dim); None = no augmentation (sampling)
    ) -> torch.Tensor:
        emb = self.embed(c_noise, class_labels, augment_labels)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
