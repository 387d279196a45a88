"""models/convert.py against diffusers' ConsistencyModelPipeline: the same f(x, σ) and the same samples.

For each public model (CD ImageNet-64, CT ImageNet-64, CD bedroom-256) a UNet2DModel is built from the hub's
config.json with seeded random weights, saved as a hub-shaped folder and as an OpenAI state dict, converted,
and run beside the pipeline with the same x_T, labels and per-step noise. The default run uses reduced block
widths (tests/unit/models/public_models.py); `-m slow` runs the full-size models, `-m gpu` on CUDA.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from models import checkpoint
from models.__main__ import main
from models.consistency import ConsistencyModel
from models.convert import ConvertError, convert, guess_model_id, karras_index_sigma, load_folder
from models.sampling import multistep_sample
from tests.unit.models import public_models as pm

pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[3]
SIGMAS = [80.0, 20.0, 1.3824, 0.1, 0.002]  # σ_max … σ_min, one image each in one batch
TOLERANCE = 1e-4  # max abs, fp32
TWO_STEP = {"cd_imagenet64_l2": 22, "ct_imagenet64": 106, "cd_bedroom256_lpips": 17}  # launch.sh --ts 0,i,N-1


class Case:
    """One public model: diffusers' UNet, its hub folder, and what we convert it into."""

    def __init__(self, root: Path, model_id: str, unet_cfg: dict[str, Any], device: str = "cpu") -> None:
        self.model_id, self.unet_cfg, self.device = model_id, unet_cfg, device
        self.train_steps = pm.MODELS[model_id][1]
        self.diffusers = pm.diffusers_unet(unet_cfg, seed=len(model_id))
        self.folder = pm.write_hub_folder(root / f"diffusers-{model_id}", unet_cfg, self.train_steps, self.diffusers)
        self.converted = convert(self.folder)
        self.ours = self.converted.model.to(device)
        self.diffusers.to(device)
        self.pipe = pm.pipeline(self.diffusers, self.train_steps)

    def batch(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        size = self.unet_cfg["sample_size"]
        x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(self.device)
        conditional = self.unet_cfg["num_class_embeds"] is not None
        labels = torch.tensor([7, 999, 0, 512, 3][:n], device=self.device) if conditional else None
        return x, labels

    @torch.no_grad()
    def reference_f(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """f(x, σ) as the pipeline computes it: scheduler scalings around the raw UNet."""
        sched = self.pipe.scheduler
        c_skip, c_out = (c.reshape(-1, 1, 1, 1) for c in sched.get_scalings_for_boundary_condition(sigma))
        c_in = 1 / (sigma**2 + sched.config.sigma_data**2).sqrt().reshape(-1, 1, 1, 1)
        t = torch.from_numpy(sched.sigma_to_t(sigma.cpu().double().numpy())).to(self.device)
        return c_skip * x + c_out * self.diffusers(c_in * x, t, class_labels=labels).sample

    @torch.no_grad()
    def compare_f(self) -> float:
        x, labels = self.batch(len(SIGMAS))
        sigma = torch.tensor(SIGMAS, device=self.device)
        x = x * sigma.reshape(-1, 1, 1, 1)
        return float((self.reference_f(x, sigma, labels) - self.ours(x, sigma, labels)).abs().max())

    @torch.no_grad()
    def compare_sample(self, steps: int, n: int) -> float:
        x, labels = self.batch(n, seed=steps)
        timesteps = pm.karras_indices(steps, self.train_steps, TWO_STEP[self.model_id])
        x_T = x * self.pipe.scheduler.init_noise_sigma
        ref, noises = pm.reference_sample(self.pipe, x_T, timesteps, labels, seed=100 + steps)
        sigmas = [float(s) for s in self.pipe.scheduler.sigmas[:steps]]  # the pipeline's own (fp32) schedule
        got = multistep_sample(self.ours, x_T, sigmas, [z.to(self.device) for z in noises[: steps - 1]], labels)
        return float((ref - got).abs().max())


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("hub")
    return {model_id: Case(root, model_id, cfg) for model_id, cfg in pm.REDUCED.items()}


@pytest.mark.parametrize("model_id", list(pm.REDUCED))
def test_f_equals_the_pipeline(cases: dict[str, Case], model_id: str) -> None:
    assert cases[model_id].compare_f() < TOLERANCE


@pytest.mark.parametrize("model_id", list(pm.REDUCED))
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_samples_equal_the_pipeline(cases: dict[str, Case], model_id: str, steps: int) -> None:
    n = 1 if "256" in model_id else 2  # a batch of 2 where it is cheap: images must not mix
    assert cases[model_id].compare_sample(steps, n) < TOLERANCE


def test_the_converted_config(cases: dict[str, Case]) -> None:
    imagenet = cases["cd_imagenet64_l2"].ours.cfg
    assert imagenet.backbone == "adm" and imagenet.scale_shift_norm and imagenet.num_classes == 1000
    assert imagenet.attn_resolutions == (32, 16, 8) and imagenet.channel_mult == (1, 2, 3, 4)
    bedroom = cases["cd_bedroom256_lpips"].ours.cfg
    assert not bedroom.scale_shift_norm and bedroom.num_classes == 0 and bedroom.channel_mult == (1, 1, 2, 2, 4, 4)
    assert bedroom.attn_resolutions == (32, 16, 8) and bedroom.image_size == 256


def test_schedules_come_from_the_launch_script(cases: dict[str, Case]) -> None:
    """Two steps at Karras index i of N (launch.sh --ts 0,i,N-1 --steps N)."""
    expected = {"cd_imagenet64_l2": 1.3824, "ct_imagenet64": 1.9128, "cd_bedroom256_lpips": 4.3656}
    for model_id, sigma in expected.items():
        schedules = cases[model_id].converted.schedules
        assert schedules[1] == [80.0]
        assert schedules[2][0] == 80.0 and schedules[2][1] == pytest.approx(sigma, abs=1e-4)
    assert karras_index_sigma(0, 40, 0.002, 80.0, 7.0) == pytest.approx(80.0)
    assert karras_index_sigma(39, 40, 0.002, 80.0, 7.0) == pytest.approx(0.002)


def test_the_released_model_is_read_from_its_name() -> None:
    assert guess_model_id("diffusers-cd_imagenet64_lpips") == "cd_imagenet64_lpips"
    assert guess_model_id("CT_BEDROOM256.pt") == "ct_bedroom256"
    assert guess_model_id("unnamed", 64, 201) == "ct_imagenet64"  # ImageNet-64: the scheduler's N tells
    assert guess_model_id("unnamed", 256, 40) is None  # bedroom l2 (ts 18) or LPIPS (17): --model-id says
    assert guess_model_id("cd_cat256_l2.pt") is None  # the launch script has no two-step CD cat schedule


def test_saved_checkpoint_round_trip(cases: dict[str, Case], tmp_path: Path) -> None:
    case = cases["cd_imagenet64_l2"]
    names = tmp_path / "classes.txt"
    names.write_text("".join(f"class {i}\n" for i in range(1000)))
    out = tmp_path / "cd.safetensors"
    main(["convert", str(case.folder), "--out", str(out), "--class-names", str(names)])
    loaded = checkpoint.load(out)
    meta = loaded.meta
    assert meta.config == case.ours.cfg and meta.preset == "cd_imagenet64_l2"
    assert meta.class_names is not None and meta.class_names[999] == "class 999"
    assert meta.schedules == case.converted.schedules
    weights = case.folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert meta.provenance["source"] == "diffusers" and meta.provenance["sha256"] == pm_sha256(weights)
    assert_same_weights(loaded.model, case.ours)


def test_openai_state_dict_converts_to_the_same_model(cases: dict[str, Case], tmp_path: Path) -> None:
    for model_id, case in cases.items():
        pt = tmp_path / f"{model_id}.pt"
        torch.save(pm.openai_state_dict(case.diffusers.cpu(), case.unet_cfg), pt)
        converted = convert(pt, flags=pm.openai_flags(case.unet_cfg))
        assert converted.model.cfg == case.ours.cfg.replace(sigma_min=0.002)
        assert converted.model_id == model_id and converted.schedules == case.converted.schedules
        assert converted.provenance["source"] == "openai" and converted.provenance["sha256"] == pm_sha256(pt)
        assert_same_weights(converted.model, case.ours)


def test_pickled_bin_folder_converts_to_the_same_model(cases: dict[str, Case], tmp_path: Path) -> None:
    case = cases["cd_bedroom256_lpips"]
    folder = pm.write_hub_folder(tmp_path / "bin", case.unet_cfg, 40, case.diffusers.cpu(), weights="bin")
    assert_same_weights(convert(folder, model_id="cd_bedroom256_lpips").model, case.ours)
    with pytest.raises(ConvertError, match="pickled weights are not served"):
        load_folder(folder)


def test_a_safetensors_folder_loads_in_memory(cases: dict[str, Case]) -> None:
    case = cases["ct_imagenet64"]
    loaded = load_folder(case.folder)
    assert loaded.meta.config == case.ours.cfg and loaded.meta.schedules == case.converted.schedules
    assert_same_weights(loaded.model, case.ours)


def test_presets_describe_the_released_models() -> None:
    from models.convert import OPENAI_PRESETS, config_from_openai_flags

    imagenet = config_from_openai_flags(OPENAI_PRESETS["openai-imagenet64"])
    assert (imagenet.model_channels, imagenet.channel_mult, imagenet.num_res_blocks) == (192, (1, 2, 3, 4), 3)
    assert imagenet.head_channels == 64 and imagenet.num_classes == 1000 and imagenet.scale_shift_norm
    lsun = config_from_openai_flags(OPENAI_PRESETS["openai-lsun256"])
    assert (lsun.model_channels, lsun.channel_mult, lsun.num_res_blocks) == (256, (1, 1, 2, 2, 4, 4), 2)
    assert lsun.num_classes == 0 and not lsun.scale_shift_norm and lsun.attn_resolutions == (32, 16, 8)
    with torch.device("meta"):
        for cfg, hub in ((imagenet, pm.IMAGENET64_UNET), (lsun, pm.BEDROOM256_UNET)):
            from diffusers import UNet2DModel

            ours = ConsistencyModel.from_config(cfg).num_parameters()
            assert ours == UNet2DModel.from_config(hub).num_parameters()


# ---------------------------------------------------------------------------------------------- malformed sources


def run_convert(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["convert", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def broken_folder(cases: dict[str, Case], tmp_path: Path) -> Path:
    case = cases["cd_imagenet64_l2"]
    return pm.write_hub_folder(tmp_path / "broken", case.unet_cfg, 40, case.diffusers.cpu())


def test_folder_without_unet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model_index.json").write_text('{"_class_name": "ConsistencyModelPipeline"}')
    out = tmp_path / "out.safetensors"
    assert "no unet/ folder" in run_convert([str(tmp_path / "src"), "--out", str(out)], capsys)
    assert not out.exists()


def test_unsupported_block_type(cases: dict[str, Case], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken_folder(cases, tmp_path)
    cfg = {**cases["cd_imagenet64_l2"].unet_cfg}
    cfg["down_block_types"] = ["DownBlock2D", *cfg["down_block_types"][1:]]
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out.safetensors"
    err = run_convert([str(folder), "--out", str(out)], capsys)
    assert "down_block_types[0] = 'DownBlock2D' is not supported" in err
    assert not out.exists()


def test_bin_holding_more_than_tensors(cases: dict[str, Case], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken_folder(cases, tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    out = tmp_path / "out.safetensors"
    torch.save({"conv_in.weight": torch.zeros(1), "step": 3}, folder / "unet" / "diffusion_pytorch_model.bin")
    assert "entry 'step' is a int, not a tensor" in run_convert([str(folder), "--out", str(out)], capsys)
    torch.save({"model": Path("x")}, folder / "unet" / "diffusion_pytorch_model.bin")  # needs an arbitrary class
    assert "weights_only" in run_convert([str(folder), "--out", str(out)], capsys)
    assert not out.exists()


def test_state_dict_missing_keys(cases: dict[str, Case], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = cases["cd_imagenet64_l2"]
    state = pm.openai_state_dict(case.diffusers.cpu(), case.unet_cfg)
    del state["input_blocks.5.1.qkv.weight"]
    pt = tmp_path / "cd_imagenet64_l2.pt"
    torch.save(state, pt)
    out = tmp_path / "out.safetensors"
    err = run_convert([str(pt), "--out", str(out), "--flags", pm.openai_flags(case.unet_cfg)], capsys)
    assert "missing tensor 'input_blocks.5.1.qkv.weight'" in err
    err = run_convert([str(pt), "--out", str(out), "--preset", "openai-imagenet64"], capsys)  # full-size flags
    assert re.search(r"tensor 'time_embed.0.weight' has shape \(128, 32\), the model needs \(768, 192\)", err), err
    assert not out.exists()


def test_folder_weights_with_a_missing_tensor(cases: dict[str, Case], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file, save_file

    folder = broken_folder(cases, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["mid_block.attentions.0.to_k.bias"]
    save_file(state, weights)
    out = tmp_path / "out.safetensors"
    err = run_convert([str(folder), "--out", str(out)], capsys)
    assert "no tensor 'mid_block.attentions.0.to_k.bias' (needed for 'middle_block.1.qkv.bias')" in err
    assert not out.exists()


def test_edm_teachers_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pt = tmp_path / "edm_imagenet64_ema.pt"
    torch.save({}, pt)
    out = tmp_path / "out.safetensors"
    assert "EDM teacher" in run_convert([str(pt), "--out", str(out), "--preset", "openai-imagenet64"], capsys)
    assert not out.exists()


def test_cli_is_one_line_and_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    proc = subprocess.run([sys.executable, "-m", "models", "convert", str(tmp_path), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "model_index.json" in proc.stderr
    assert not out.exists()


def test_models_and_service_never_import_diffusers() -> None:
    pattern = re.compile(r"^\s*(import|from)\s+diffusers\b", re.MULTILINE)
    offenders = [str(p.relative_to(REPO)) for package in ("models", "service") for p in (REPO / package).rglob("*.py")
                 if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


# ---------------------------------------------------------------------------------------------- full size


def check_full_size(tmp_path: Path, model_id: str, device: str) -> None:
    case = Case(tmp_path, model_id, pm.MODELS[model_id][0], device)
    assert case.compare_f() < TOLERANCE
    for steps in (1, 2, 4):
        assert case.compare_sample(steps, n=1) < TOLERANCE, steps


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 2 cores: ImageNet-64 ~2 min, bedroom-256 ~10 min
@pytest.mark.parametrize("model_id", list(pm.MODELS))
def test_full_size_models_equal_the_pipeline(tmp_path: Path, model_id: str) -> None:
    torch.set_num_threads(2)
    check_full_size(tmp_path, model_id, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model_id", list(pm.MODELS))
def test_full_size_models_equal_the_pipeline_on_cuda(tmp_path: Path, model_id: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    check_full_size(tmp_path, model_id, "cuda")


# ---------------------------------------------------------------------------------------------- helpers


def pm_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key].cpu(), sb[key].cpu()), key
