"""A typed training recipe: one field per technique, presets `ict`, `ct`, `edm`, `ect`, `cd`, and their registries.

Each iCT improvement can be switched back to CT's choice alone (the paper's ablation):
distance, timesteps, curriculum, teacher, weighting, fourier_scale, dropout. `objective` says what a step
optimises: consistency training (iCT, CT), EDM denoising, consistency tuning (ECT) or distillation (CD).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from . import cd, ct, ect, edm, ict

Distance = Literal["pseudo_huber", "l2"]
Timesteps = Literal["lognormal", "uniform"]
Curriculum = Literal["ict", "ct"]
Teacher = Literal["student", "ema"]
Weighting = Literal["ict", "uniform"]
EctWeighting = Literal["gap", "edm"]  # ECT §3's 1/(t − r), or EDM's λ(t)
Objective = Literal["ct", "edm", "ect", "cd"]  # the keys of training.hybrid.TRAINERS


@dataclass(frozen=True)
class Recipe:
    """Which choice each technique takes; defaults are iCT's (Song & Dhariwal 2023, Table 1)."""

    distance: Distance = "pseudo_huber"  # iCT §3.3; CT: squared L2 (LPIPS needs weights we do not ship)
    timesteps: Timesteps = "lognormal"  # iCT §3.5; CT: i ~ U[1, N−1]
    curriculum: Curriculum = "ict"  # iCT §3.4 doubling N(k); CT: square-root N(k)
    teacher: Teacher = "student"  # iCT §3.2 stopgrad(student); CT: EMA of the student with μ(k)
    weighting: Weighting = "ict"  # iCT §3.1 λ = 1/(σ_{i+1} − σ_i); CT: λ = 1
    fourier_scale: float = 0.02  # iCT §3.1; CT (NCSN++): 16
    dropout: float | None = None  # None keeps the model preset's rate (iCT: 0.3 on CIFAR-10); CT: 0
    s0: int | None = None  # curriculum start; None = the curriculum's own (iCT 10, CT 2)
    s1: int | None = None  # curriculum end; None = the curriculum's own (iCT 1280, CT 150)
    mu0: float = ct.MU0  # EMA-teacher decay: CT's μ(k) at N = s0; ECT and CD (--teacher ema): θ⁻'s fixed μ
    huber_c: float | None = None  # pseudo-Huber c; None = iCT's 0.00054·√d (§3.3)
    p_mean: float = ict.P_MEAN  # lognormal timesteps (iCT §3.5)
    p_std: float = ict.P_STD
    objective: Objective = "ct"  # ct: consistency training (iCT, CT); edm: denoising; ect: tuning; cd: distillation
    ect_stages: int = ect.STAGES  # ECT: stages of the mapping function over the run, r = t·(1 − n(t)/q^(stage+1))
    ect_stage_steps: int | None = None  # ECT: iterations per stage (ECT's schedule); None: the run's K / ect_stages
    ect_q: float = ect.Q  # ECT: t − r shrinks by q per stage
    ect_weighting: EctWeighting = "gap"  # ECT: w(t, r) = 1/(t − r) (ECT §3), or edm: λ(t) = (t² + σ_d²)/(t·σ_d)²
    cd_levels: int = cd.LEVELS  # CD: N, the Karras levels whose adjacent pairs (t′, t) the teacher steps between

    def __post_init__(self) -> None:
        for name, kind in CHOICES.items():
            value = getattr(self, name)
            if value not in get_args(kind):
                raise ValueError(f"recipe {name} {value!r} is not one of {list(get_args(kind))}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"recipe dropout {self.dropout} is not in [0, 1)")
        if self.fourier_scale <= 0:
            raise ValueError(f"recipe fourier_scale {self.fourier_scale} must be > 0")
        if not 0.0 <= self.mu0 < 1.0:
            raise ValueError(f"recipe mu0 {self.mu0} is not in [0, 1)")
        if self.huber_c is not None and not self.huber_c > 0:
            raise ValueError(f"recipe huber_c {self.huber_c} must be > 0")
        if self.objective not in get_args(Objective):
            raise ValueError(f"recipe objective {self.objective!r} is not one of {list(get_args(Objective))}")
        if self.ect_stage_steps is not None and self.ect_stage_steps < 1:
            raise ValueError(f"recipe ect_stage_steps {self.ect_stage_steps} must be >= 1")
        if self.ect_stages < 1 or self.ect_q <= 1 or self.cd_levels < 2:
            raise ValueError(
                f"recipe needs ect_stages >= 1, ect_q > 1 and cd_levels >= 2, got {self.ect_stages}, "
                f"{self.ect_q} and {self.cd_levels}"
            )
        s0, s1 = self.curriculum_bounds
        if not 1 <= s0 <= s1:
            raise ValueError(f"recipe needs 1 <= s0 <= s1, got s0={s0}, s1={s1}")

    @property
    def curriculum_bounds(self) -> tuple[int, int]:
        default_s0, default_s1 = CURRICULA[self.curriculum].bounds
        return (self.s0 if self.s0 is not None else default_s0, self.s1 if self.s1 is not None else default_s1)

    def discretization_steps(self, k: int, total_steps: int) -> int:
        """N(k) of this recipe's curriculum: the same pure function of k on every rank."""
        s0, s1 = self.curriculum_bounds
        return CURRICULA[self.curriculum].steps(k, total_steps, s0, s1)

    def teacher_decay(self, n_k: int) -> float:
        """μ(k) of the EMA teacher (CM Appendix C); 0 for iCT's stop-gradient teacher (iCT §3.2)."""
        return ct.target_ema_decay(n_k, self.curriculum_bounds[0], self.mu0) if self.teacher == "ema" else 0.0

    def pseudo_huber_c(self, dim: int) -> float:
        """c of the pseudo-Huber distance for data of dimension `dim`: `huber_c` when set, else iCT's (§3.3)."""
        return self.huber_c if self.huber_c is not None else ict.pseudo_huber_c(dim)

    def timestep_probabilities(self, sigmas: torch.Tensor) -> torch.Tensor:
        return TIMESTEPS[self.timesteps](sigmas, self)

    def distance_fn(self) -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
        return DISTANCES[self.distance]

    def weighting_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return WEIGHTINGS[self.weighting]

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown recipe keys {unknown}; allowed: {sorted(allowed)}")
        return cls(**data)


@dataclass(frozen=True)
class CurriculumSpec:
    steps: Callable[[int, int, int, int], int]  # N(k, K, s0, s1)
    bounds: tuple[int, int]  # default (s0, s1)


CHOICES: dict[str, Any] = {
    "distance": Distance,
    "timesteps": Timesteps,
    "curriculum": Curriculum,
    "teacher": Teacher,
    "weighting": Weighting,
    "ect_weighting": EctWeighting,
}
DISTANCES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "pseudo_huber": ict.pseudo_huber,
    "l2": ct.squared_l2,
}
TIMESTEPS: dict[str, Callable[[torch.Tensor, Recipe], torch.Tensor]] = {
    "lognormal": lambda sigmas, r: ict.timestep_probabilities(sigmas, r.p_mean, r.p_std),
    "uniform": lambda sigmas, r: ct.uniform_probabilities(sigmas),
}
CURRICULA: dict[str, CurriculumSpec] = {
    "ict": CurriculumSpec(ict.discretization_steps, (ict.S0, ict.S1)),
    "ct": CurriculumSpec(ct.discretization_steps, (ct.S0, ct.S1)),
}
WEIGHTINGS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ict": ict.loss_weights,
    "uniform": ct.uniform_weights,
}

RECIPES: dict[str, Recipe] = {
    "ict": Recipe(),
    "ct": Recipe(
        distance="l2",
        timesteps="uniform",
        curriculum="ct",
        teacher="ema",
        weighting="uniform",
        fourier_scale=16.0,
        dropout=0.0,
    ),
    # EDM pretraining (EDM Table 1): the denoiser ECT and CD start from, on the same backbone and Fourier scale.
    "edm": Recipe(objective="edm", p_mean=edm.P_MEAN, p_std=edm.P_STD),
    # ECT (Geng et al. 2024): iCT's lognormal t, pseudo-Huber, stop-gradient target (--teacher ema: θ⁻ with CD's
    # μ = 0.95); r from the mapping function.
    "ect": Recipe(objective="ect", p_mean=ect.P_MEAN, p_std=ect.P_STD, mu0=cd.MU),
    # CD (CM Algorithm 2): n ~ U[1, N−1], λ = 1; iCT's stop-gradient target (--teacher ema: CM's θ⁻ with μ = 0.95).
    "cd": Recipe(objective="cd", timesteps="uniform", weighting="uniform", mu0=cd.MU),
}

# The CLI switch of each technique: flag -> recipe field (values are checked by Recipe itself).
TECHNIQUE_FLAGS: dict[str, str] = {
    "--distance": "distance",
    "--timesteps": "timesteps",
    "--curriculum": "curriculum",
    "--teacher": "teacher",
    "--weighting": "weighting",
    "--fourier-scale": "fourier_scale",
    "--dropout": "dropout",
}


def recipe(name: str, **overrides: Any) -> Recipe:
    """The named preset with some techniques switched; unknown names are an error listing the known ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return RECIPES[name].replace(**changes)


def ablation_variants() -> dict[str, Recipe]:
    """iCT, CT, and iCT with each technique switched back to CT's choice alone (iCT's ablation, in miniature)."""
    ict_r, ct_r = RECIPES["ict"], RECIPES["ct"]
    variants = {"ict": ict_r, "ct": ct_r}
    for field in TECHNIQUE_FLAGS.values():
        if getattr(ict_r, field) != getattr(ct_r, field):
            variants[f"ict/{field}={getattr(ct_r, field)}"] = ict_r.replace(**{field: getattr(ct_r, field)})
    return variants
