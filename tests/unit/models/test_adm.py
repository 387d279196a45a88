"""models/adm.py: the ADM backbone's pieces, its config rules, and checkpoints that name (or omit) a backbone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from models import checkpoint
from models.adm import ADMUNet, AttentionBlock, GroupNorm32, timestep_embedding
from models.config import ModelConfig
from models.consistency import ConsistencyModel
from models.unet import UNet
from tests.conftest import randomize

PRETRAINED = Path(__file__).resolve().parents[3] / "models" / "pretrained" / "digits.safetensors"
TINY_ADM = ModelConfig(
    backbone="adm", image_channels=3, image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
    attn_resolutions=(8,), head_channels=16, embedding="positional", num_classes=5, num_groups=8,
)


def test_timestep_embedding_is_cos_first_with_adm_frequencies() -> None:
    t = torch.tensor([0.0, 1.0, -1553.7, 1095.5])
    emb = timestep_embedding(t, 8)
    freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
    expected = [[math.cos(v * f) for f in freqs] + [math.sin(v * f) for f in freqs] for v in t.tolist()]
    torch.testing.assert_close(emb, torch.tensor(expected), atol=2e-4, rtol=0)  # fp32 arguments up to ~1500 rad
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))


def test_timestep_embedding_equals_diffusers() -> None:
    diffusers_embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = torch.linspace(-1553.7, 1095.5, 33)
    ref = diffusers_embeddings.get_timestep_embedding(t, 192, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(timestep_embedding(t, 192), ref)


def test_group_norm_runs_in_fp32_with_adm_eps() -> None:
    norm = GroupNorm32(8, 32, eps=1e-5)
    x = torch.randn(2, 32, 4, 4).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16 and norm.eps == 1e-5
    torch.testing.assert_close(out, norm(x.float()).to(torch.bfloat16), atol=0, rtol=0)


def test_qkv_is_split_in_three_before_heads() -> None:
    """cm/unet.py's flash path reads qkv rows as (three, heads, channels); a per-head split would differ."""
    torch.manual_seed(0)
    block = randomize(AttentionBlock(32, TINY_ADM), seed=1).eval()
    x = torch.randn(1, 32, 4, 4)
    qkv = block.qkv(block.norm(x)).reshape(1, 3 * 32, 16)
    q, k, v = (t.reshape(1, 2, 16, 16) for t in qkv.chunk(3, dim=1))  # (B, heads, head_ch, HW)
    weights = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(16), dim=-1)  # (B, heads, HW, HW)
    out = (weights @ v.transpose(-1, -2)).transpose(-1, -2).reshape(1, 32, 4, 4)
    expected = x + block.proj_out(out)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_adm_config_rules() -> None:
    with pytest.raises(ValueError, match="needs embedding='positional'"):
        TINY_ADM.replace(embedding="fourier")
    with pytest.raises(ValueError, match="multiples of head_channels"):
        TINY_ADM.replace(head_channels=24)
    with pytest.raises(ValueError, match="scale_shift_norm=False needs backbone='adm'"):
        ModelConfig(scale_shift_norm=False)
    with pytest.raises(ValueError, match="backbone must be"):
        ModelConfig(backbone="dit")  # type: ignore[arg-type]


def test_from_config_builds_the_named_backbone() -> None:
    assert isinstance(ConsistencyModel.from_config(TINY_ADM).backbone, ADMUNet)
    assert isinstance(ConsistencyModel.from_config(ModelConfig()).backbone, UNet)


@pytest.mark.parametrize("scale_shift", [True, False])
def test_adm_checkpoint_round_trip(tmp_path: Path, scale_shift: bool) -> None:
    torch.manual_seed(0)
    model = randomize(ConsistencyModel.from_config(TINY_ADM.replace(scale_shift_norm=scale_shift)), seed=2).eval()
    path = checkpoint.save(tmp_path / "adm.safetensors", model, schedules={2: [80.0, 1.5]})
    loaded = checkpoint.load(path)
    assert loaded.meta.config.backbone == "adm" and isinstance(loaded.model.backbone, ADMUNet)
    x, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 4])
    with torch.no_grad():
        assert torch.equal(loaded.model(x, 3.0, labels), model(x, 3.0, labels))


def test_checkpoints_without_a_backbone_field_load_the_unet() -> None:
    """models/pretrained/digits.safetensors predates the field: it loads unchanged, as the unet backbone."""
    meta = checkpoint.read_meta(PRETRAINED.read_bytes())
    assert meta.config.backbone == "unet" and meta.config.scale_shift_norm
    assert isinstance(checkpoint.load(PRETRAINED).model.backbone, UNet)
