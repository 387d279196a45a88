"""Evaluation: the Fréchet formula, the digits feature space and its floor, the mid-σ search, the FID
Inception network's architecture and weight loading, and the command line's errors."""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from models.checkpoint import load, save
from models.consistency import ConsistencyModel
from training import evaluate, features
from training.data import digits_split
from training.evaluate import (
    feature_statistics,
    frechet_distance,
    search_mid_sigma,
    ternary_search,
    write_schedule,
)
from training.features import (
    ClassifierRecipe,
    FIDInceptionV3,
    InceptionWeightsError,
    inception_features,
    load_inception,
    train_digits_classifier,
)

ROOT = Path(__file__).resolve().parents[3]
CLASS_NAMES = [str(i) for i in range(10)]
# torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696) and with the TF
# graph's 1008-way fc instead of 1000 (+8 x 2049) that is the FID network's count.
FID_INCEPTION_PARAMETERS = 27_161_264 - 3_326_696 + 8 * 2049


@pytest.fixture(scope="module", autouse=True)
def classifier_cache(tmp_path_factory: pytest.TempPathFactory):
    """One cache folder for the module: the digits classifier is trained once, not in ~/.cache."""
    folder = tmp_path_factory.mktemp("cm-cache")
    evaluate._digits_reference.cache_clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CM_CACHE_DIR", str(folder))
        yield folder
    evaluate._digits_reference.cache_clear()


@pytest.fixture
def checkpoint(tmp_path: Path, tiny_model: ConsistencyModel) -> Path:
    return save(
        tmp_path / "tiny.safetensors",
        tiny_model,
        preset="digits",
        class_names=CLASS_NAMES,
        training_step=77,
        schedules={1: [80.0], 4: [80.0, 10.0, 1.0, 0.1]},
        provenance={"recipe": "ict"},
    )


def raw_bits(path: Path) -> dict[str, torch.Tensor]:
    """Every stored tensor as its raw bit pattern (so NaN or -0.0 cannot hide a change)."""
    return {k: v.view(torch.int32) for k, v in load_bytes(path).items()}


def load_bytes(path: Path) -> dict[str, torch.Tensor]:
    """Tensors copied out of the file (load_file maps it, and these tests rewrite files in place)."""
    return st_load(path.read_bytes())


# --- the Fréchet distance ----------------------------------------------------------------------------


def test_frechet_distance_diagonal_closed_form() -> None:
    # diagonal Σ: d² = ‖μ1 − μ2‖² + Σ_i (√a_i − √b_i)² = 25 + (1 − 3)² + (2 − 4)² = 33
    mu1, mu2 = np.zeros(2), np.array([3.0, 4.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 16.0])
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(33.0, abs=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(33.0, abs=1e-9)
    # a common rotation of both Gaussians changes nothing; Σ1Σ2 is then not diagonal
    c, s = math.cos(0.7), math.sin(0.7)
    r = np.array([[c, -s], [s, c]])
    assert frechet_distance(r @ mu1, r @ s1 @ r.T, r @ mu2, r @ s2 @ r.T) == pytest.approx(33.0, abs=1e-8)
    # one dimension: (μ1 − μ2)² + (σ1 − σ2)²
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-1.0]), np.array([[1.0]])) == (
        pytest.approx(4.0 + 1.0)
    )


def test_frechet_distance_matches_symmetric_form_for_non_commuting_covariances() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)

    def psd_sqrt(m: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    # Tr((Σ1Σ2)^½) = Tr((Σ1^½ Σ2 Σ1^½)^½), the symmetric form computed by eigendecomposition
    r1 = psd_sqrt(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * psd_sqrt(r1 @ s2 @ r1))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # "matrix is singular": the point of the test
def test_frechet_distance_of_singular_covariances_is_finite() -> None:
    z = np.zeros((3, 3))
    assert frechet_distance(np.zeros(3), z, np.ones(3), z) == pytest.approx(3.0, abs=1e-4)


def test_identical_sets_are_at_distance_zero() -> None:
    f = torch.randn(500, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stats = feature_statistics(f)
    assert abs(frechet_distance(*stats, *stats)) < 1e-8
    shifted = feature_statistics(f + 1.0)
    assert frechet_distance(*stats, *shifted) == pytest.approx(16.0, rel=1e-6)  # ‖μ shift‖² only


# --- the digits feature space ------------------------------------------------------------------------


def test_classifier_training_is_deterministic() -> None:
    train_x, train_y, _, _ = digits_split()
    recipe = ClassifierRecipe(epochs=1)
    a, b = (train_digits_classifier(train_x[:400], train_y[:400], recipe) for _ in range(2))
    c = train_digits_classifier(train_x[:400], train_y[:400], ClassifierRecipe(epochs=1, seed=1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_classifier_is_cached_as_safetensors_and_retrained_when_corrupt(classifier_cache: Path) -> None:
    ref = evaluate.digits_reference()
    files = list(classifier_cache.glob("digits-classifier-*.safetensors"))
    assert len(files) == 1
    assert ref.info["classifier_accuracy"] >= 0.95
    train_x, train_y, heldout_x, heldout_y = digits_split()
    cached = features.digits_classifier(train_x, train_y, heldout_x, heldout_y)
    assert cached.cache_path == files[0]
    stored = load_bytes(files[0])
    assert all(torch.equal(stored[k], v) for k, v in cached.model.state_dict().items())
    other_seed = features.classifier_cache_key(train_x, train_y, ClassifierRecipe(seed=1))
    assert other_seed != features.classifier_cache_key(train_x, train_y, ClassifierRecipe())
    files[0].write_bytes(b"not safetensors")
    retrained = features.digits_classifier(train_x, train_y, heldout_x, heldout_y)
    assert all(torch.equal(stored[k], v) for k, v in retrained.model.state_dict().items())


def test_floor_is_positive_and_small_and_the_space_sees_damage() -> None:
    floor = evaluate.digits_floor()
    train_x, _, heldout_x, _ = digits_split()
    assert 0 < floor < 20
    assert evaluate.frechet_distance_for_samples(heldout_x) == pytest.approx(0.0, abs=1e-6)
    shifted = torch.roll(train_x, shifts=1, dims=-1)  # every digit moved one pixel to the right
    noise = torch.rand(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert evaluate.frechet_distance_for_samples(shifted) > 10 * floor
    assert evaluate.frechet_distance_for_samples(noise) > 100 * floor


def test_evaluate_checkpoint_reports_each_step_count_deterministically(checkpoint: Path) -> None:
    report = evaluate.evaluate_checkpoint(checkpoint, steps=(1, 4), n_samples=60, seed=3, batch=25)
    assert report == evaluate.evaluate_checkpoint(checkpoint, steps=(1, 4), n_samples=60, seed=3, batch=25)
    rebatched = evaluate.evaluate_checkpoint(checkpoint, steps=(1, 4), n_samples=60, seed=3, batch=60)
    for row, other in zip(report["results"], rebatched["results"], strict=True):  # same images, other kernels
        assert other["frechet_distance"] == pytest.approx(row["frechet_distance"], rel=1e-6)
    assert [r["steps"] for r in report["results"]] == [1, 4]
    assert report["results"][1]["sigmas"] == [80.0, 10.0, 1.0, 0.1]  # the checkpoint's own schedule
    for row in report["results"]:
        assert row["frechet_distance"] > 0
        assert row["ratio_to_floor"] == pytest.approx(row["frechet_distance"] / report["floor"])
    other = evaluate.evaluate_checkpoint(checkpoint, steps=(1,), n_samples=60, seed=4)
    assert other["results"][0]["frechet_distance"] != report["results"][0]["frechet_distance"]


def test_conditional_labels_are_balanced_and_seeded() -> None:
    labels = evaluate.balanced_labels(2000, 10, seed=0)
    assert np.bincount(labels).tolist() == [200] * 10
    assert labels == evaluate.balanced_labels(2000, 10, seed=0) != evaluate.balanced_labels(2000, 10, seed=1)
    assert evaluate.balanced_labels(10, 0, seed=0) is None


# --- the mid-σ search ---------------------------------------------------------------------------------


def test_ternary_search_finds_the_minimum_of_a_unimodal_function() -> None:
    calls = []

    def objective(x: float) -> float:
        calls.append(x)
        return abs(x - 1.3) ** 1.5 + 2.0

    result = ternary_search(objective, -5.0, 5.0, iterations=30)
    assert result.best_x == pytest.approx(1.3, abs=1e-4)
    assert result.best_value == pytest.approx(2.0, abs=1e-5)
    assert len(calls) == 60 and len(result.trace) == 30
    lo, hi = result.trace[-1][:2]
    assert lo < 1.3 < hi and hi - lo < 10 * (2 / 3) ** 29 + 1e-12
    edge = ternary_search(lambda x: x, 0.0, 1.0, iterations=20)  # minimum at the lower end
    assert edge.best_x < 1e-3
    with pytest.raises(ValueError, match="lo < hi"):
        ternary_search(objective, 1.0, 1.0, iterations=3)


def test_write_schedule_keeps_weights_bit_identical_and_other_metadata(checkpoint: Path) -> None:
    before, meta = raw_bits(checkpoint), load(checkpoint).meta
    write_schedule(checkpoint, 2, [80.0, 0.5])
    after = load(checkpoint).meta
    assert after.schedules == {1: [80.0], 2: [80.0, 0.5], 4: [80.0, 10.0, 1.0, 0.1]}
    fields = ("config", "preset", "class_names", "training_step", "provenance")
    assert [getattr(after, f) for f in fields] == [getattr(meta, f) for f in fields]
    bits = raw_bits(checkpoint)
    assert before.keys() == bits.keys() and all(torch.equal(before[k], bits[k]) for k in before)
    with pytest.raises(ValueError, match="sigma"):
        write_schedule(checkpoint, 2, [80.0, 0.001])  # below σ_min


def test_search_mid_sigma_is_deterministic_and_writes_the_best_sigma(checkpoint: Path, tmp_path: Path) -> None:
    before = raw_bits(checkpoint)
    out = tmp_path / "searched.safetensors"
    first = search_mid_sigma(checkpoint, n_samples=40, iterations=2, batch=40, out=out)
    assert raw_bits(checkpoint).keys() == before.keys() and load(checkpoint).meta.schedules.get(2) is None
    second = search_mid_sigma(checkpoint, n_samples=40, iterations=2, batch=40)  # in place
    assert first.trace == second.trace
    lo, hi = math.log(0.002), math.log(80.0)
    assert first.trace[0][:2] == (lo, hi) and lo < first.best_x < hi
    assert first.best_value == min(min(t[3], t[5]) for t in first.trace)
    for path in (out, checkpoint):
        assert load(path).meta.schedules[2] == pytest.approx([80.0, math.exp(first.best_x)], rel=1e-12)
        bits = raw_bits(path)
        assert all(torch.equal(before[k], bits[k]) for k in before)
    # the written schedule scores what the search measured for it
    report = evaluate.evaluate_checkpoint(checkpoint, steps=(2,), n_samples=40, batch=40)
    assert report["results"][0]["frechet_distance"] == pytest.approx(first.best_value, rel=1e-9)


# --- the FID Inception network ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_state(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A randomly initialised network's state dict (non-trivial BatchNorm statistics), as safetensors."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    with torch.no_grad():
        for name, buf in net.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                buf.normal_(0, 0.1)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("inception") / "pt_inception.safetensors"
    save_file(state, path)
    return path, state


def test_inception_architecture_has_the_fid_network_parameter_count() -> None:
    net = FIDInceptionV3()
    assert sum(p.numel() for p in net.parameters()) == FID_INCEPTION_PARAMETERS
    keys = net.state_dict().keys()
    assert {"Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch3x3dbl_3b.bn.running_var", "fc.weight"} <= keys
    assert not any(k.startswith("AuxLogits") for k in keys)


def test_inception_weights_load_strictly_from_safetensors_and_pth(
    inception_state: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    path, state = inception_state
    net = load_inception(path)
    assert not net.training
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    pth = tmp_path / "pt_inception-2015-12-05.pth"  # as distributed: a pickled state dict, no step counters
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, pth)
    from_pth = load_inception(pth)
    assert all(torch.equal(v, state[k]) for k, v in from_pth.state_dict().items())


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-inception-weights",))


def test_wrong_inception_files_give_clear_errors(
    inception_state: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, state = inception_state
    with pytest.raises(InceptionWeightsError, match=r"--inception-weights .*no such file"):
        load_inception(tmp_path / "missing.pth")
    partial = {k: v for k, v in state.items() if not k.startswith("Mixed_7c")}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(InceptionWeightsError, match=r"missing tensors, e.g. \['Mixed_7c"):
        load_inception(tmp_path / "partial.safetensors")
    reshaped = dict(state, **{"fc.weight": torch.zeros(1000, 2048)})
    save_file(reshaped, tmp_path / "resnet.safetensors")
    with pytest.raises(InceptionWeightsError, match=r"'fc.weight' has shape \(1000, 2048\)"):
        load_inception(tmp_path / "resnet.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(InceptionWeightsError, match="not a readable safetensors file"):
        load_inception(tmp_path / "junk.safetensors")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"x": _Exploit()}, protocol=2))
    with pytest.raises(InceptionWeightsError, match="weights_only=True"):
        load_inception(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned-by-inception-weights").exists()


def test_inception_features_are_2048_d(inception_state: tuple[Path, dict[str, torch.Tensor]]) -> None:
    net = load_inception(inception_state[0])
    grey = torch.rand(2, 1, 8, 8) * 2 - 1  # grey digits are repeated to 3 channels, resized to 299
    out = inception_features(net, grey, batch=1)
    assert out.shape == (2, 2048) and out.dtype == torch.float64 and torch.isfinite(out).all()
    assert not torch.equal(out[0], out[1])
    as_uint8 = ((grey[1:] + 1) * 127.5).round().to(torch.uint8)  # float images are quantised to these levels
    assert torch.allclose(inception_features(net, as_uint8), out[1:], atol=1e-5)


# --- the command line ---------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "training.evaluate", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


def test_cli_missing_file_is_one_line_without_traceback(tmp_path: Path) -> None:
    proc = run_cli(str(tmp_path / "nope.safetensors"), cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "CHECKPOINT" in proc.stderr and "nope.safetensors" in proc.stderr


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--steps", "1,x"], "--steps"),
        (["--steps", "0"], "--steps"),
        (["--steps", "2,2"], "--steps"),
        (["--samples", "1"], "--samples"),
        (["--device", "nonsense"], "--device"),
        (["--inception-weights", "missing.pth"], "--inception-weights"),
        (["--data", "cifar10:/nowhere"], "--data"),
        (["--out", "x.safetensors"], "--out"),
    ],
)
def test_cli_bad_flags_name_the_flag(
    checkpoint: Path, args: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = evaluate.main([str(checkpoint), *args])
    except SystemExit as e:  # argparse's own checks
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and flag in err[0]


def test_cli_non_checkpoint_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, bogus)
    assert evaluate.main([str(bogus)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: CHECKPOINT") and "weights.pth" in err[0]


def test_cli_reports_floor_and_each_step(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate.main([str(checkpoint), "--steps", "1,2", "--samples", "50"]) == 0
    out = capsys.readouterr().out
    assert "floor (held-out vs training split)" in out and "held-out accuracy" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2"]


def test_cli_search_prints_the_trace_and_writes_the_schedule(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "searched.safetensors"
    args = ["--search-mid-sigma", "--search-samples", "20", "--search-iters", "2", "--out", str(out)]
    assert evaluate.main([str(checkpoint), *args, "--steps", "2", "--samples", "20"]) == 0
    printed = capsys.readouterr().out
    assert "ternary search over log σ_mid" in printed and "best σ_mid" in printed
    assert load(checkpoint).meta.schedules.get(2) is None  # --out leaves the original alone
    written = load(out).meta.schedules[2]
    assert written[0] == 80.0 and f"[80.0, {round(written[1], 5)}]" in printed  # the report used the new schedule


# --- memorisation: the nearest-training-digit distance ratio -------------------------------------------------------


def test_nearest_distances_match_a_brute_force_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    a, ref = torch.randn(7, 1, 8, 8, generator=gen), torch.randn(5, 1, 8, 8, generator=gen)
    expected = torch.tensor([min(float((x.double() - r.double()).norm()) for r in ref) for x in a], dtype=torch.float64)
    torch.testing.assert_close(evaluate.nearest_distances(a, ref, chunk=3), expected, rtol=1e-12, atol=0)
    assert torch.equal(evaluate.nearest_distances(ref, ref), torch.zeros(5, dtype=torch.float64))


def test_memorisation_ratio_is_one_for_new_real_digits_and_zero_for_copies() -> None:
    train_x, _, heldout_x, _ = digits_split()
    copies = train_x[torch.randint(len(train_x), (300,), generator=torch.Generator().manual_seed(0))]
    assert evaluate.memorisation_ratio(heldout_x, train_x, heldout_x) == 1.0
    assert evaluate.memorisation_ratio(copies, train_x, heldout_x) == 0.0
    noisy = (copies + 0.5 * torch.randn(copies.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    assert 0 < evaluate.memorisation_ratio(noisy, train_x, heldout_x) < 3


def test_memorisation_uses_the_training_fraction_the_checkpoint_records(
    tmp_path: Path, tiny_model: ConsistencyModel
) -> None:
    path = save(
        tmp_path / "tenth.safetensors",
        tiny_model,
        class_names=CLASS_NAMES,
        schedules={1: [80.0]},
        provenance={"data": "digits", "data_fraction": 0.1},
    )
    report = evaluate.evaluate_checkpoint(path, steps=(1,), n_samples=40, memorisation=True)
    assert 130 <= report["memorisation_train_images"] <= 160  # a tenth of the 1,437 training digits
    assert report["results"][0]["memorisation_ratio"] > 0
    assert "nearest-training-digit distance ratio" in evaluate.format_report(report)
    assert "memorisation_ratio" not in evaluate.evaluate_checkpoint(path, steps=(1,), n_samples=40)["results"][0]


def test_memorisation_is_refused_for_checkpoints_not_trained_on_digits(
    tmp_path: Path, tiny_model: ConsistencyModel
) -> None:
    path = save(
        tmp_path / "folder.safetensors",
        tiny_model,
        class_names=CLASS_NAMES,
        schedules={1: [80.0]},
        provenance={"data": "folder:/somewhere"},
    )
    with pytest.raises(evaluate.EvaluationError, match="--memorisation: only for checkpoints trained on digits"):
        evaluate.evaluate_checkpoint(path, steps=(1,), n_samples=40, memorisation=True)
