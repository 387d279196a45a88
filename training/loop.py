"""One consistency-training step and the state it acts on: student, EMA, teacher, optimizer; DDP set-up.

The step reads as the paper's phases: N(k), σ indices, shared z, student pass, teacher pass from the
same RNG state, loss, backward, clip, RAdam step, EMA. Nothing here synchronises with the host: the
loss stays on the device until the caller logs it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from models.config import ModelConfig
from models.consistency import ConsistencyModel
from models.sampling import karras_sigmas

from .augment import AUGMENT_DIM, AugmentPipe
from .config import ConfigError, Precision
from .data import Dataset, global_batch_flips, global_batch_indices
from .recipe import Recipe

log = logging.getLogger(__name__)

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


# --- distributed set-up -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (torchrun's RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_request: str | None) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU) and pick this rank's device."""
    info = DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )
    use_cuda = torch.cuda.is_available() if device_request in (None, "auto") else device_request.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"--device {device_request}: CUDA is not available on this machine")
    device = torch.device("cuda", info.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return info, device


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --- formulas applied to a batch ----------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseGrid:
    """The Karras grid of N(k) levels with each interval's sampling probability and loss weight."""

    sigmas: torch.Tensor  # (N,) float32, ascending
    probs: torch.Tensor  # (N-1,) float32, p(i) of interval [σ_i, σ_{i+1}]
    weights: torch.Tensor  # (N-1,) float32, λ(σ_i)


def noise_grid(n: int, cfg: ModelConfig, recipe: Recipe, device: torch.device) -> NoiseGrid:
    sig = karras_sigmas(n, cfg.sigma_min, cfg.sigma_max, cfg.rho)  # (N,) float64
    probs = recipe.timestep_probabilities(sig)
    weights = recipe.weighting_fn()(sig[:-1], sig[1:])  # λ in float64: σ_{i+1} − σ_i is tiny near σ_min
    return NoiseGrid(*(t.to(device=device, dtype=torch.float32) for t in (sig, probs, weights)))


def rng_devices(device: torch.device) -> list[int]:
    """CUDA devices whose generators must be forked with the CPU one (dropout runs on the GPU there)."""
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


def consistency_loss(
    student: ModelFn,
    teacher: ModelFn,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    sigma_i: torch.Tensor,
    sigma_next: torch.Tensor,
    z: torch.Tensor,
    weights: torch.Tensor,
    distance: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
    c: float,
    devices: list[int],
) -> torch.Tensor:
    """E[λ(σ_i)·d(f_θ(x + σ_{i+1}·z, σ_{i+1}), stopgrad f_θ⁻(x + σ_i·z, σ_i))] (iCT §3, CM eq. 10)."""
    x_next = x + sigma_next[:, None, None, None] * z  # (B, C, H, W), same z in both terms
    x_cur = x + sigma_i[:, None, None, None] * z
    # Student pass from a forked RNG: the teacher then replays the same dropout masks (CPU and CUDA).
    with torch.random.fork_rng(devices=devices):
        out_student = student(x_next, sigma_next, labels)
    # Teacher pass: stop-gradient.
    with torch.no_grad():
        out_teacher = teacher(x_cur, sigma_i, labels)
    per_sample = distance(out_student.float(), out_teacher.float(), c)  # (B,)
    return (weights * per_sample).mean()


# --- the trainer ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopConfig:
    total_steps: int  # K: the curriculum's horizon
    global_batch: int  # split evenly across ranks
    lr: float
    ema_decay: float  # EMA of the student, used for sampling and export
    grad_clip: float  # max global grad norm; <= 0 turns clipping off
    ema_warmup: bool = True  # ramp the EMA decay up over the first steps (see ema_decay_at)
    precision: Precision = "fp32"
    compile: bool = False
    seed: int = 0
    augment: float = 0.0  # EDM augmentation probability per op; 0 = off (the model then has no augment input)
    augment_ops: tuple[str, ...] | None = None  # the ops applied (augment.OPS); None: all
    pretrained: str | None = None  # ECT, CD: the denoiser file they start from (training.hybrid)


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's loss, on the device (no host sync)
    grad_norm: torch.Tensor | None
    n_k: int  # N(k) used by this step
    teacher_decay: float  # μ(k) of the EMA teacher, 0 for iCT
    stage: int | None = None  # ECT's stage of the mapping function (training.hybrid); None for the others


class Trainer:
    """Student (optionally DDP-wrapped and compiled), its EMA, the EMA teacher (CT), RAdam, and the step count."""

    def __init__(
        self,
        cfg: ModelConfig,
        recipe: Recipe,
        loop: LoopConfig,
        data: Dataset,
        dist_info: DistInfo,
        device: torch.device,
    ) -> None:
        if loop.global_batch % dist_info.world_size:
            raise ConfigError(f"--batch {loop.global_batch} is not divisible by the {dist_info.world_size} ranks")
        self.cfg, self.recipe, self.loop, self.data = cfg, recipe, loop, data
        self.dist, self.device = dist_info, device
        self.local_batch = loop.global_batch // dist_info.world_size
        self.step_index = 0
        self.c = recipe.pseudo_huber_c(cfg.data_dim)
        self.use_labels = cfg.num_classes > 0

        torch.manual_seed(loop.seed)  # identical initial weights on every rank
        self.student = self.build_student().to(device).train()
        if device.type == "cuda":
            self.student = self.student.to(memory_format=torch.channels_last)
        trained = self.trained_function(self.student)
        self.forward: nn.Module = torch.compile(trained) if loop.compile else trained
        self.student_fn: nn.Module = self.forward
        if dist_info.enabled:
            self.student_fn = nn.parallel.DistributedDataParallel(
                self.forward, device_ids=[device.index] if device.type == "cuda" else None
            )  # broadcasts rank 0's weights
        self.ema = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False) if recipe.teacher == "ema" else None
        self.teacher_fn: nn.Module = self.forward
        if self.teacher is not None:
            teacher = self.trained_function(self.teacher)
            self.teacher_fn = torch.compile(teacher) if loop.compile else teacher
        self.optimizer = torch.optim.RAdam(self.student.parameters(), lr=loop.lr)
        self.scaler = torch.amp.GradScaler(device.type) if loop.precision == "fp16" else None
        self.grids: dict[int, NoiseGrid] = {}
        if loop.augment > 0 and cfg.augment_dim != AUGMENT_DIM:
            raise ConfigError(
                f"--augment {loop.augment} needs a model with augment_dim {AUGMENT_DIM}, got {cfg.augment_dim}"
            )
        self.augment_pipe = AugmentPipe.of(loop.augment, loop.augment_ops) if loop.augment > 0 else None
        seed_rank_rngs(loop.seed, dist_info.rank)

    # -- what is trained (training.hybrid's trainers override these)

    def build_student(self) -> nn.Module:
        """The network whose weights are trained, EMA'd and exported: a freshly initialised consistency model."""
        return ConsistencyModel.from_config(self.cfg)

    def trained_function(self, model: nn.Module) -> nn.Module:
        """The function of a model's weights (the student's, the EMA target's) that the loss evaluates: the model."""
        return model

    # -- the pieces of one step

    def grid(self, n: int) -> NoiseGrid:
        if n not in self.grids:
            self.grids = {n: noise_grid(n, self.cfg, self.recipe, self.device)}  # N(k) only grows: keep one
        return self.grids[n]

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's slice of global batch k: the same global batch whatever the number of ranks."""
        position = k * self.loop.global_batch
        indices = global_batch_indices(self.loop.seed, position, self.loop.global_batch, len(self.data))
        flips = global_batch_flips(self.loop.seed, position, self.loop.global_batch)
        part = slice(self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch)
        x, y = self.data.batch(indices[part], flips[part])
        x = x.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(self.device, non_blocking=True) if (y is not None and self.use_labels) else None
        return x, y

    def augmented(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """EDM augmentation of batch k's clean images, and the keyword that passes its labels on ({} when off)."""
        if self.augment_pipe is None:
            return x, {}
        x, augment_labels = self.augment_pipe(x, augment_generator(self.loop.seed, self.dist.rank, k, self.device))
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x, {"augment_labels": augment_labels}

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = AUTOCAST_DTYPES[self.loop.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def step(self) -> StepResult:
        """Train on global batch k = self.step_index and advance k."""
        k = self.step_index
        x, labels = self.batch(k)
        # Phase 0: EDM augmentation of the clean images; both passes see its labels.
        x, extra = self.augmented(x, k)
        student_fn = functools.partial(self.student_fn, **extra) if extra else self.student_fn
        teacher_fn = functools.partial(self.teacher_fn, **extra) if extra else self.teacher_fn
        # Phase 1: N(k) and its grid — a pure function of k, so identical on every rank.
        n_k = self.recipe.discretization_steps(k, self.loop.total_steps)
        grid = self.grid(n_k)
        # Phase 2: σ indices i ~ p(i) and one shared z.
        idx = torch.multinomial(grid.probs, x.shape[0], replacement=True)  # (B,) 0-based i
        sigma_i, sigma_next, weights = grid.sigmas[idx], grid.sigmas[idx + 1], grid.weights[idx]
        z = torch.randn_like(x)
        # Phase 3: student and teacher passes (same RNG state), loss.
        with self.autocast():
            loss = consistency_loss(
                student_fn,
                teacher_fn,
                x,
                labels,
                sigma_i,
                sigma_next,
                z,
                weights,
                self.recipe.distance_fn(),
                self.c,
                rng_devices(self.device),
            )
        # Phase 4: backward, clip, RAdam step.
        grad_norm = self.optimizer_step(loss)
        # Phase 5: EMA of the student (for sampling); EMA teacher with μ(k) (CT only).
        with torch.no_grad():
            decay = ema_decay_at(k, self.loop.ema_decay) if self.loop.ema_warmup else self.loop.ema_decay
            lerp_params(self.ema, self.student, 1.0 - decay)
            mu = self.recipe.teacher_decay(n_k)
            if self.teacher is not None:
                lerp_params(self.teacher, self.student, 1.0 - mu)
        self.step_index = k + 1
        return StepResult(loss.detach(), grad_norm, n_k, mu)

    def optimizer_step(self, loss: torch.Tensor) -> torch.Tensor | None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grad_norm = None
        if self.loop.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.student.parameters(), self.loop.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return grad_norm

    # -- state for checkpoints (RNG states and files are state.py's job)

    def state_dict(self) -> dict:
        return {
            "step": self.step_index,
            "student": self.student.state_dict(),
            "ema": self.ema.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "data": {
                "seed": self.loop.seed,
                "position": self.step_index * self.loop.global_batch,  # images of the endless stream consumed
                "size": len(self.data),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.ema.load_state_dict(state["ema"])
        if self.teacher is not None:
            if state.get("teacher") is None:
                raise ValueError("the checkpoint has no EMA teacher but this recipe needs one (--teacher ema)")
            self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step_index = int(state["step"])
        data = state["data"]
        if data["position"] != self.step_index * self.loop.global_batch or data["size"] != len(self.data):
            raise ValueError(f"the checkpoint's data order {data} does not match this run (batch or data changed)")


def ema_decay_at(k: int, decay: float) -> float:
    """min(decay, (1 + k)/(10 + k)): the EMA forgets the random initial weights in a short run (TF's EMA warmup)."""
    return min(decay, (1 + k) / (10 + k))


def ema_warmup_note(decay: float, steps: int) -> str | None:
    """What to tell the user when the warmup keeps the EMA below --ema-decay for the whole run, else None: the ramp
    (1 + k)/(10 + k) reaches `decay` only at step index k = (10·decay − 1)/(1 − decay) (8,990 for 0.999)."""
    last = ema_decay_at(steps - 1, decay)
    if last >= decay:
        return None
    k = math.floor((10 * decay - 1) / (1 - decay))
    while ema_decay_at(k, 1.0) < decay:  # the formula's rounding: the first index whose ramp is there
        k += 1
    return (f"--ema-decay {decay:g} is never reached: with --ema-warmup the decay is min({decay:g}, (1 + k)/(10 + k)), "
            f"which needs {k + 1:,} steps, and this run's last step uses {last:.5f}; "
            f"--no-ema-warmup uses {decay:g} from the first step")


def seed_rank_rngs(seed: int, rank: int) -> None:
    """Each rank draws its own σ indices, noise and dropout; seeded from (seed, rank)."""
    import random

    import numpy as np

    rank_seed = seed * 1009 + 1 + rank
    torch.manual_seed(rank_seed)  # also seeds every CUDA device
    np.random.seed(rank_seed % 2**32)
    random.seed(rank_seed)


def augment_generator(seed: int, rank: int, k: int, device: torch.device) -> torch.Generator:
    """The augmentation RNG of step k on this rank: a pure function of (seed, rank, k), so resume is exact."""
    return torch.Generator(device=device).manual_seed(((seed * 1009 + 1 + rank) * 1_000_003 + k) % 2**63)


@torch.no_grad()
def lerp_params(target: nn.Module, source: nn.Module, weight: float) -> None:
    """target ← target + weight·(source − target), i.e. an EMA with decay 1 − weight."""
    tgt = list(target.parameters())
    src = [p.detach() for p in source.parameters()]
    if weight == 1.0:
        torch._foreach_copy_(tgt, src)
    elif weight > 0.0:
        torch._foreach_lerp_(tgt, src, weight)
