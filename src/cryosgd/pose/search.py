"""Pose search: a global search over a rotation grid × shifts, then local refinement.

Both score poses by the log-likelihood of :mod:`cryosgd.pose.scores` on a band of image
frequencies (:class:`BandImages`). The global search keeps the ``K`` best rotations of a
grid (each with its best shift). The local search refines each kept pose in tangent
coordinates (:func:`cryosgd.pose.so3.exp_map`, right-multiplied: no pole singularity): per
level it scores a 7-point star of rotations ``R·exp(h·u)``, ``u ∈ {0, ±e_x, ±e_y, ±e_z}``,
times the 3 × 3 shifts ``t + s·{−1, 0, 1}²``, moves each coordinate to the peak of the parabola
through its three scores (within one step; to the better neighbour where the scores are not
concave), and halves ``h`` and ``s``. The curvature of those parabolas is the log-likelihood's:
its inverse is the posterior variance of the rotation, the per-particle angular accuracy that
the refinement's schedule follows (RELION estimates it by a separate perturbation test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from cryosgd.data.batch import Batch, WeightedRows
from cryosgd.fourier.grids import FourierGrid
from cryosgd.fourier.slice import Interp, extract
from cryosgd.model.ctf import ctf_values
from cryosgd.pose.scores import band_mask, score_poses
from cryosgd.pose.shifts import phase_ramps
from cryosgd.pose.so3 import cube_offsets, exp_map

_STAR = ((0, 0, 0), (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
_SHIFTS = tuple((x, y) for y in (-1, 0, 1) for x in (-1, 0, 1))  # row-major in (y, x); centre at 4


@dataclass(frozen=True)
class BandImages:
    """A batch of images on a band of frequencies, with what scoring them needs.

    ``images_ft (B, P)`` complex, ``ctf (B, P)`` real, ``weight (B, P)`` real = m_k/σ²_k of each
    image's optics group, ``freq_px (P, 2)`` Fourier-index units, ``freq_invA (P, 2)`` Å⁻¹.
    """

    images_ft: Tensor
    ctf: Tensor
    weight: Tensor
    freq_px: Tensor
    freq_invA: Tensor

    def __len__(self) -> int:
        return self.images_ft.shape[0]

    def rows(self, index: slice | Tensor) -> BandImages:
        return BandImages(self.images_ft[index], self.ctf[index], self.weight[index], self.freq_px, self.freq_invA)

    def within(self, freq_invA: float) -> BandImages:
        """The frequencies with |k| ≤ ``freq_invA`` (Å⁻¹)."""
        keep = self.freq_invA.norm(dim=1) <= freq_invA
        if bool(keep.all()):
            return self
        return BandImages(self.images_ft[:, keep], self.ctf[:, keep], self.weight[:, keep], self.freq_px[keep],
                          self.freq_invA[keep])

    @classmethod
    def of(cls, batch: Batch, grid: FourierGrid, band_px: float, sigma2: Tensor) -> BandImages:
        """A batch's images, CTFs and weights m_k/σ²_k (``sigma2 (G, shells)`` per optics group and
        image shell) on the frequencies of ``grid`` within ``band_px``."""
        device, dtype = batch.images_ft.device, batch.images_ft.real.dtype
        keep = band_mask(grid.freq_px, band_px).to(device)
        freq_px, freq_invA = grid.freq_px.to(device)[keep], grid.freq_invA().to(device)[keep]
        ctf = ctf_values(batch.ctf.to(dtype=torch.float64), freq_invA)
        shells = grid.shell_px.to(device)[keep]
        weight = grid.multiplicity.to(device)[keep] / sigma2.to(device, torch.float64)[batch.groups(device)][:, shells]
        return cls(batch.images_ft[:, keep], ctf.to(dtype), weight.to(dtype), freq_px.to(dtype), freq_invA.to(dtype))


@dataclass(frozen=True)
class PoseTable:
    """Candidate poses of every particle of a half-set (rows in the half's order), best first.

    ``rotations (N, K, 3, 3)``, ``shift_A (N, K, 2)``, ``log_likelihood (N, K)``, ``weight (N, K)``
    posterior weights (rows sum to 1), ``sigma_deg (N,)`` the best pose's angular accuracy.
    """

    rotations: Tensor
    shift_A: Tensor
    log_likelihood: Tensor
    weight: Tensor
    sigma_deg: Tensor

    def candidates(self, rows: Tensor, k: int) -> Candidates:
        """The first ``k`` candidates of the particles ``rows``."""
        return Candidates(self.rotations[rows, :k], self.shift_A[rows, :k], self.log_likelihood[rows, :k])


@dataclass(frozen=True)
class Candidates:
    """``K`` poses per particle: ``rotations (B, K, 3, 3)``, ``shift_A (B, K, 2)`` origins,
    ``log_likelihood (B, K)``."""

    rotations: Tensor
    shift_A: Tensor
    log_likelihood: Tensor

    def best_first(self) -> tuple[Candidates, Tensor]:
        """Each particle's poses sorted by log-likelihood, best first, and the ``(B, K)`` order
        (the old position of each)."""
        order = self.log_likelihood.argsort(dim=1, descending=True)

        def pick(t: Tensor) -> Tensor:
            return torch.take_along_dim(t, order.view(*order.shape, *[1] * (t.dim() - 2)), 1)

        return Candidates(pick(self.rotations), pick(self.shift_A), pick(self.log_likelihood)), order

    def first(self, rows: Tensor) -> Candidates:
        """The first pose of each particle ``rows``."""
        return Candidates(self.rotations[rows, :1], self.shift_A[rows, :1], self.log_likelihood[rows, :1])


def global_search(volume_ft: Tensor, images: BandImages, rotations: Tensor, shifts_A: Tensor, *, top_k: int,
                  scale_profiled: bool = False, interp: Interp = "trilinear", chunk: int = 256) -> Candidates:
    """The ``top_k`` best of ``rotations (J, 3, 3)`` × origins for every image, in chunks of
    ``chunk`` images. ``shifts_A`` is ``(T, 2)``, shared, or ``(B, T, 2)`` per image.
    ``scale_profiled`` scores with the image scale maximised out (a reference of unknown greyscale)."""
    parts = []
    for start in range(0, len(images), chunk):
        rows = slice(start, start + chunk)
        part = images.rows(rows)
        shifts = shifts_A[rows] if shifts_A.dim() == 3 else shifts_A
        top = score_poses(volume_ft, rotations, shifts, part.images_ft, part.ctf, part.weight, part.freq_px,
                          part.freq_invA, interp=interp, top_k=top_k, scale_profiled=scale_profiled)
        chosen = shifts[top.shift_index] if shifts.dim() == 2 else torch.take_along_dim(
            shifts, top.shift_index[..., None], 1)
        parts.append(Candidates(rotations[top.rotation_index], chosen, top.log_likelihood))
    return Candidates(*(torch.cat(fields) for fields in zip(*((p.rotations, p.shift_A, p.log_likelihood)
                                                               for p in parts))))


def local_search(volume_ft: Tensor, images: BandImages, start: Candidates, *, step_deg: float, step_A: float,
                 levels: int, radius_A: float | None = None, live: Tensor | None = None,
                 interp: Interp = "trilinear", chunk: int = 256) -> tuple[Candidates, Tensor]:
    """Refine every candidate pose by ``levels`` levels of the star search (module docstring),
    from steps ``step_deg`` and ``step_A``, then score the refined poses on the whole band.
    With ``live (B, K)`` bool, only those candidates are refined; the others keep their poses
    with log-likelihood −inf and accuracy ``inf`` (they had no posterior weight: searching
    them would cost as much as a live one, for nothing).

    With ``radius_A`` (the particle's radius), every level but the last, of step h, scores only
    the frequencies |k| ≤ 1 / (2 R h) (:func:`level_band_invA`): those whose phase at the
    particle's edge turns by at most half a wave between the star's points. Beyond them the
    scores oscillate on the scale of a step, and the parabola through three of them says
    nothing about the peak; a coarse step sees the coarse band (cheaply). The last level scores
    the whole band, so that its curvature, the accuracy returned, is the log-likelihood's.

    Returns:
        The refined :class:`Candidates` and ``(B, K)`` angular accuracy (degrees): the
        posterior standard deviation of the rotation from the last level's curvature
        (``inf`` where the scores were not concave).
    """
    if live is not None and not bool(live.all()):
        image, k = live.nonzero(as_tuple=True)
        some = Candidates(start.rotations[image, k, None], start.shift_A[image, k, None],
                          start.log_likelihood[image, k, None])
        found, sigma = local_search(volume_ft, images.rows(image), some, step_deg=step_deg, step_A=step_A,
                                    levels=levels, radius_A=radius_A, interp=interp, chunk=chunk)
        every = Candidates(start.rotations.clone(), start.shift_A.clone(),
                           found.log_likelihood.new_full(live.shape, -torch.inf))
        for target, value in zip((every.rotations, every.shift_A, every.log_likelihood),
                                 (found.rotations, found.shift_A, found.log_likelihood)):
            target[image, k] = value[:, 0].to(target.dtype)
        accuracy = torch.full(live.shape, math.inf, dtype=sigma.dtype, device=sigma.device)
        accuracy[image, k] = sigma[:, 0]
        return every, accuracy
    parts = []
    for begin in range(0, len(images), chunk):
        rows = slice(begin, begin + chunk)
        part = images.rows(rows)
        rotations, shifts = start.rotations[rows], start.shift_A[rows]
        h, s = math.radians(step_deg), step_A
        sigma = torch.full(rotations.shape[:2], math.inf, dtype=images.ctf.dtype, device=rotations.device)
        for level_index in range(levels):
            coarse = radius_A is not None and level_index < levels - 1
            level = part.within(level_band_invA(h, radius_A)) if coarse else part
            scores = _star_scores(volume_ft, level, rotations, shifts, h, s, interp)
            rotations, shifts, sigma = _move(rotations, shifts, scores, h, s)
            h, s = h / 2, s / 2
        final = _star_scores(volume_ft, part, rotations, shifts, 0.0, 0.0, interp, centre_only=True)
        parts.append((rotations, shifts, final[..., 0, 0], sigma))
    rotations, shifts, log_likelihood, sigma = (torch.cat(fields) for fields in zip(*parts))
    return Candidates(rotations, shifts, log_likelihood), sigma


def posterior_grid(volume_ft: Tensor, images: BandImages, start: Candidates, step_deg: Tensor, *, keep: int,
                   interp: Interp = "trilinear", max_block_elements: int = 2**24) -> Candidates:
    """The ``keep`` most likely rotations of a grid around each particle's first pose (``start``:
    ``(B, K, …)`` candidates), at its origin: ``R·exp(h·c)`` for the 19 points ``c`` of
    {−1, 0, 1}³ within √2 of the centre (the centre, 6 faces, 12 edges) of the particle's step
    ``h = step_deg (B,)``, scored on all of the images' band; returns ``(B, keep)``
    :class:`Candidates`, best first.

    Those poses and their log-likelihoods stand for the particle's posterior near its best
    pose (a map update weighs each by it, as RELION's expectation step weighs every sampled
    pose), where the star search's parabolas keep only its peak and curvature. On the box-128
    benchmark, of the 8 most likely poses of the full 27 × 9 grid (3 × 3 origins 0.75 pixel
    apart) 97 % kept the centre origin and 4 % were corners: the origin is known far better
    than the rotation, and the corners (√3 steps out) hold little weight. Images are scored in
    chunks whose slices hold at most ``max_block_elements`` values."""
    real = images.ctf.dtype
    cube = cube_offsets(1, device=step_deg.device, dtype=real)
    grid = cube[cube.abs().sum(1) <= 2]  # (19, 3)
    origin = torch.zeros(1, 2, dtype=real, device=step_deg.device)
    chunk = max(1, max_block_elements // (len(grid) * images.freq_px.shape[0]))
    parts = []
    for begin in range(0, len(images), chunk):
        rows = slice(begin, begin + chunk)
        rotations, shifts = start.rotations[rows, :1], start.shift_A[rows, :1]
        turns = grid * torch.deg2rad(step_deg[rows].to(real))[:, None, None, None]  # (b, 1, 19, 3)
        scores = _grid_scores(volume_ft, images.rows(rows), rotations, shifts, turns, origin, interp)[:, 0, 0]
        top = scores.topk(min(keep, len(grid)), dim=1)  # (b, keep)
        chosen = rotations[:, 0, None] @ exp_map(torch.take_along_dim(turns[:, 0], top.indices[..., None], 1))
        parts.append((chosen, shifts.expand(-1, chosen.shape[1], -1), top.values))
    return Candidates(*(torch.cat(fields) for fields in zip(*parts)))


def level_band_invA(step_rad: float, radius_A: float) -> float:
    """The band (Å⁻¹) a local-search level of step ``step_rad`` scores: a rotation by the step
    moves a point of the particle (radius ``radius_A``) by at most R·h, which turns the phase of
    frequency |k| by 2π|k|Rh; half a wave (π) at most: |k| ≤ 1/(2Rh), Crowther's d = D·h."""
    return 1.0 / (2 * radius_A * step_rad)


def _star_scores(volume_ft: Tensor, images: BandImages, rotations: Tensor, shifts: Tensor, h: float, s: float,
                 interp: Interp, centre_only: bool = False) -> Tensor:
    """``(B, K, 9, 7)`` log-likelihoods of the star rotations × shift grid around each pose
    (``(B, K, 1, 1)`` at the pose itself with ``centre_only``)."""
    real = images.ctf.dtype
    star = torch.tensor(_STAR[:1] if centre_only else _STAR, dtype=real, device=rotations.device) * h
    offsets = torch.tensor(_SHIFTS[4:5] if centre_only else _SHIFTS, dtype=real, device=rotations.device) * s
    return _grid_scores(volume_ft, images, rotations, shifts, star, offsets, interp)


def _grid_scores(volume_ft: Tensor, images: BandImages, rotations: Tensor, shifts: Tensor, turns: Tensor,
                 offsets_A: Tensor, interp: Interp) -> Tensor:
    """``(B, K, S, R)`` log-likelihoods of the rotations ``R·exp(u)`` × origins ``t + δ`` around
    each pose (``rotations (B, K, 3, 3)``, ``shifts (B, K, 2)``), for the tangent vectors
    ``turns`` (radians), ``(R, 3)`` shared or ``(B, K, R, 3)`` per pose, and the offsets
    ``offsets_A (S, 2)``.

    The shift grid's phase separates, e^{2πik·(t + δ)} = e^{2πik·t} · e^{2πik·δ}: the image side
    ``ã e^{2πik·t}`` is made once per pose, multiplied by each rotation's slice, and the
    offsets δ, shared by every pose, enter by one matrix product."""
    dtype = images.images_ft.dtype
    batch, k = rotations.shape[:2]
    children = rotations[:, :, None] @ exp_map(turns)  # (B, K, R, 3, 3)
    count = children.shape[2]
    projections = extract(volume_ft, children.reshape(-1, 3, 3).to(volume_ft.real.dtype),
                          images.freq_px.to(volume_ft.real.dtype), interp).reshape(batch, k, count, -1).to(dtype)
    at_pose = (images.weight * images.ctf * images.images_ft.conj())[:, None, :] * phase_ramps(
        images.freq_invA, shifts).to(dtype)  # (B, K, P)
    product = at_pose[:, :, None, :] * projections  # (B, K, R, P)
    offset_phases = phase_ramps(images.freq_invA, offsets_A).to(dtype)  # (S, P)
    left = torch.cat([product.real, -product.imag], -1).reshape(batch * k * count, -1)
    right = torch.cat([offset_phases.real, offset_phases.imag], -1)
    cross = (left @ right.T).reshape(batch, k, count, len(offsets_A)).transpose(2, 3)
    norm = torch.einsum("bp,bkrp->bkr", images.weight * images.ctf**2, projections.real**2 + projections.imag**2)
    return cross - 0.5 * norm[:, :, None, :]


def _move(rotations: Tensor, shifts: Tensor, scores: Tensor, h: float, s: float):
    """One level's move of every pose to the parabolic peaks of its star and shift scores;
    returns the new rotations, shifts and the rotation's posterior std (degrees)."""
    by_rotation = scores.amax(2)  # (B, K, 7): each rotation at its best shift
    step_u, curvature = _parabola(by_rotation[..., 0], by_rotation[..., 1::2], by_rotation[..., 2::2])
    centre = scores[..., 0]  # (B, K, 9): the shifts at the centre rotation
    step_x, _ = _parabola(centre[..., 4], centre[..., 5:6], centre[..., 3:4])
    step_y, _ = _parabola(centre[..., 4], centre[..., 7:8], centre[..., 1:2])
    rotations = rotations @ exp_map(step_u * h)
    shifts = shifts + torch.cat([step_x, step_y], -1) * s
    variance = torch.where(curvature < 0, h**2 / (-curvature).clamp(min=1e-30), torch.full_like(curvature, math.inf))
    return rotations, shifts, torch.rad2deg(variance.mean(-1).sqrt())


def _parabola(f0: Tensor, plus: Tensor, minus: Tensor) -> tuple[Tensor, Tensor]:
    """Per coordinate, the offset (in steps, within ±1) of the peak of the parabola through
    (−1, minus), (0, f0), (+1, plus), and its curvature; where it is not concave, a whole step
    to the better neighbour if that beats the centre."""
    f0 = f0[..., None]
    slope, curvature = 0.5 * (plus - minus), plus + minus - 2 * f0
    peak = (-slope / curvature.clamp(max=-1e-30)).clamp(-1.0, 1.0)
    better = torch.where(plus > minus, 1.0, -1.0).to(f0.dtype) * (torch.maximum(plus, minus) > f0)
    return torch.where(curvature < 0, peak, better), curvature


def weighted_rows(batch: Batch, candidates: Candidates, weight: Tensor, group: Tensor) -> WeightedRows:
    """One row per (image, pose with weight > 0, symmetry mate ``R @ L``), each with its
    weight ``w / |G|`` (times the image's own weight); the poses of an image that share an
    origin share one image of the rows' ``images``."""
    size, k = weight.shape
    mates = group.shape[0]
    image_weight = torch.ones(size, dtype=weight.dtype, device=weight.device) if batch.weight is None \
        else batch.weight.to(weight)
    w = (weight * image_weight[:, None] / mates).reshape(-1)  # (size · k)
    live = w > 0
    shift = candidates.shift_A.reshape(-1, 2)[live]
    image = torch.arange(size, device=weight.device).repeat_interleave(k)[live]
    origins, which = torch.unique(torch.cat([image[:, None].to(shift.dtype), shift], 1), dim=0, return_inverse=True)
    images = replace(batch.take(origins[:, 0].long()), shift_A=origins[:, 1:].to(batch.shift_A.dtype), weight=None)
    rotations = candidates.rotations.reshape(-1, 3, 3)[live][:, None] @ group.to(candidates.rotations)
    dtype = batch.rotations.dtype
    return WeightedRows(images, which.repeat_interleave(mates), rotations.reshape(-1, 3, 3).to(dtype),
                        w[live].repeat_interleave(mates).to(dtype))
