"""Zero-shot editing with a consistency model (CM paper, Algorithm 4; `cm/karras_diffusion.py` of its repository).

Each step of the sampler (models.sampling, shared with generation) is followed by the projection
x₀ ← A⁻¹[(A y) ⊙ (1 − Ω) + (A x₀) ⊙ Ω]: an orthogonal transform A (so A⁻¹ = Aᵀ), the reference y and a mask Ω
that is 1 where the model's values are kept. The sampler starts from x = A⁻¹[(A y) ⊙ (1 − Ω)] + σ₁·z.
A `Projection` is data (A as a matrix over one axis, A y, Ω); one small function per task builds it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

LUMA = (0.2989, 0.5870, 0.1140)  # ITU-R BT.601 luma weights, as in the paper's colorization


@dataclass(frozen=True)
class Projection:
    """x₀ ← A⁻¹[(A y) ⊙ (1 − Ω) + (A x₀) ⊙ Ω] (CM Algorithm 4, line 8), for a batch (B, C, H, W) in [-1, 1].

    A is orthogonal and acts on the last axis: the channel axis (colorization), each p×p patch flattened
    (super-resolution), or nothing (inpainting: A = I). `kept` = (A y) ⊙ (1 − Ω) and `omega` = Ω are in that
    space and broadcast over the batch (one reference for all the images of a request).
    """

    matrix: torch.Tensor | None  # (k, k) orthogonal A; None: A = I
    kept: torch.Tensor  # (A y) ⊙ (1 − Ω), (1, …): y's part, zero where the model's values go
    omega: torch.Tensor  # Ω: 1 where the model's values are kept, 0 where y's are, broadcastable to `kept`
    patch: int = 0  # p > 0: A acts on p×p patches; 0: on channels (or, with no matrix, on pixels)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        return self._inverse(self.kept + self._forward(x0) * self.omega)

    def to(self, device: torch.device) -> Projection:
        """The same projection with its tensors on `device` (itself when they are there already)."""
        if self.kept.device == device:
            return self
        matrix = None if self.matrix is None else self.matrix.to(device)
        return replace(self, matrix=matrix, kept=self.kept.to(device), omega=self.omega.to(device))

    @property
    def start(self) -> torch.Tensor:
        """A⁻¹[(A y) ⊙ (1 − Ω)]: what is known of the image, (1, C, H, W); sampling starts from it plus σ₁·z."""
        return self._inverse(self.kept)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matrix is None:
            return x
        if self.patch:
            return to_patches(x, self.patch) @ self.matrix  # (B, C, H/p, W/p, p²)
        return x.movedim(1, -1) @ self.matrix  # (B, H, W, C)

    def _inverse(self, a: torch.Tensor) -> torch.Tensor:
        if self.matrix is None:
            return a
        back = a @ self.matrix.T  # A⁻¹ = Aᵀ
        if self.patch:
            return from_patches(back, self.patch)
        return back.movedim(-1, 1)


def project_rows(x0: torch.Tensor, parts: list[tuple[Projection | None, int]]) -> torch.Tensor:
    """A batch's estimates x0 (B, C, H, W) with each part's rows (`size` of them, in order) through its projection,
    or left as they are (None). When every projection is inpainting's (A = I) the batch takes one product and one
    sum, kept + x0 ⊙ Ω, with Ω = 1 and kept = 0 on unprojected rows (exact: Ω is 0 or 1), rather than one per part.
    The projections' tensors may be in host memory and x0 on a device: they go to it (one copy each of Ω and kept).
    """
    if all(projection is None for projection, _ in parts):
        return x0
    shape = x0.shape[1:]
    if all(projection is None or projection.matrix is None for projection, _ in parts):
        host = next(p for p, _ in parts if p is not None).kept.device
        ones, zeros = torch.ones(1, *shape, device=host), torch.zeros(1, *shape, device=host)
        omega = torch.cat([_rows(ones if p is None else p.omega, size, shape) for p, size in parts])
        kept = torch.cat([_rows(zeros if p is None else p.kept, size, shape) for p, size in parts])
        return torch.addcmul(kept.to(x0.device), x0, omega.to(x0.device))
    rows, at = [], 0
    for projection, size in parts:
        part = x0[at : at + size]
        rows.append(part if projection is None else projection.to(x0.device)(part))
        at += size
    return torch.cat(rows)


def _rows(t: torch.Tensor, size: int, shape: torch.Size) -> torch.Tensor:
    return t if size == 1 and t.shape[1:] == shape else t.expand(size, *shape)


def orthogonal_with_first(v: torch.Tensor) -> torch.Tensor:
    """An orthogonal (k, k) matrix whose first column is v / ‖v‖ (QR of [v, e₂, …, e_k]), float64."""
    k = v.numel()
    m = torch.eye(k, dtype=torch.float64)
    m[:, 0] = v.to(torch.float64) / v.to(torch.float64).norm()
    q, _ = torch.linalg.qr(m)
    return q if q[:, 0].sum() > 0 else -q  # QR fixes columns up to sign: keep +v


def to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H/p, W/p, p²): each p×p patch flattened row by row."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h // p, w // p, p * p)


def from_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of `to_patches`: (B, C, H/p, W/p, p²) -> (B, C, H, W)."""
    b, c, hp, wp, _ = x.shape
    return x.reshape(b, c, hp, wp, p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, hp * p, wp * p)


def inpainting(y: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor) -> Projection:
    """A = I, Ω = the mask (1: regenerate): known pixels are kept exactly (CM Algorithm 4, inpainting).

    y (C, H, W) in [-1, 1]; mask (H, W) of 0/1 (any nonzero counts as 1); CPU tensors or numpy arrays. Built in
    numpy: a server builds one per request on its engine thread, where each torch call hands the GIL over.
    """
    y = np.asarray(y, dtype=np.float32)[None]  # (1, C, H, W)
    omega = np.empty_like(y)
    omega[:] = np.asarray(mask) != 0  # over every channel
    return Projection(None, torch.from_numpy(y * (1 - omega)), torch.from_numpy(omega))


def super_resolution(low: torch.Tensor, p: int) -> Projection:
    """A = an orthogonal basis of each p×p patch whose first vector is 1/p (the patch mean, scaled): that
    coefficient comes from the low-resolution image, the other p² − 1 from the model (CM Algorithm 4, §D).

    low (C, H/p, W/p) in [-1, 1]; the result works on (B, C, H, W).
    """
    matrix = orthogonal_with_first(torch.ones(p * p)).float()  # (p², p²)
    kept = torch.zeros(1, *low.shape, p * p)  # (1, C, H/p, W/p, p²)
    kept[..., 0] = low.float() * p  # ⟨patch of the mean, 1/p⟩ = p² · mean / p
    omega = torch.ones(p * p)
    omega[0] = 0.0
    return Projection(matrix, kept, omega, patch=p)


def colorization(grey: torch.Tensor) -> Projection:
    """A = an orthogonal 3×3 colour transform whose first axis is luma / ‖luma‖: luma from the grey input, the
    two chroma axes from the model (CM Algorithm 4, colorization). grey (H, W) or (1, H, W) in [-1, 1]: the
    output's luma Σ LUMA[c]·x_c equals it."""
    luma = torch.tensor(LUMA, dtype=torch.float64)
    matrix = orthogonal_with_first(luma).float()  # (3, 3)
    g = grey.float().reshape(grey.shape[-2:])  # (H, W)
    kept = torch.zeros(1, *g.shape, 3)  # (1, H, W, 3)
    kept[..., 0] = g / float(luma.norm())  # ⟨x, luma/‖luma‖⟩ = g / ‖luma‖  ⇔  ⟨x, luma⟩ = g
    omega = torch.tensor([0.0, 1.0, 1.0])
    return Projection(matrix, kept, omega)


def upsample(low: torch.Tensor, p: int) -> torch.Tensor:
    """Piecewise-constant upsampling by p: (…, h, w) -> (…, h·p, w·p)."""
    return low.repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1)
