"""Batched pose scores: log-likelihoods of all rotations × shifts as two matrix products.

For image ``X_i`` (half-disc rfft2 values), CTF ``C_i``, slice ``P_j`` of rotation ``j`` and
origin ``t`` (Å), the model is ``X_i ≈ C_i · exp(+2πi k · t) · P_j`` (:mod:`cryosgd.conventions`)
and the score is the exact log-likelihood up to a per-particle constant::

    LL_i(j, t) = −½ Σ_k w_k |X_ik − C_ik e^{2πik·t} P_j(k)|² + ½ Σ_k w_k |X_ik|²
               = Σ_k w_k [Re(a_it(k) · P_j(k)) − ½ C_ik² |P_j(k)|²],
    a_it(k) = C_ik · conj(X_ik) · e^{+2πik·t},   w_k = m_k / σ²_k,

``m_k`` the multiplicity of the half-plane pixel (1 at kx = 0, else 2) and ``σ²_k = E|n(k)|²``
the complex noise variance. All per-particle factors sit on the image side, so particles
of any defocus share one set of projections, and with ``ã = w·a``::

    cross[(i, t), j] = [Re ã_it, −Im ã_it] · [Re P_j; Im P_j]     (B·T × 2P) · (2P × J)
    norm[i, j]       = (w C²)_i · |P_j|²                            (B × P) · (P × J)
    LL = cross − ½ norm

Cost: ≈ 4·T·P·J flop per particle for ``cross`` (``norm`` is 1/(2T) of it), plus ≈ 75·P flop
per rotation for the trilinear slices, shared by the batch. Memory of :func:`score_poses`:
the image side, ``(B·T, 2P)`` real plus a ``(B, T, P)`` complex temporary, and per chunk of
``J_c`` rotations a ``(B, T, J_c)`` score block (two more temporaries of that size with a shift
prior or ``reduce="logsumexp"``), ``(J_c, 2P)`` projections and the slice temporaries
(≈ 30·J_c·P values), with ``J_c = max_block_elements // (B·T + 32·P)`` unless
``chunk_rotations`` is given: the default 2²⁴ elements is 64 MiB per block in float32. The
batch ``B`` bounds the image side. Scores are in the input dtype: in float32 the absolute
error of ``cross − ½ norm`` is ≈ 1e-7 · norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from cryosgd.errors import InputError
from cryosgd.fourier.slice import Interp, extract
from cryosgd.pose.shifts import phase_ramps

Reduce = Literal["max", "logsumexp"]


@dataclass(frozen=True)
class TopPoses:
    """The ``K`` best rotations per particle, each with its best shift, best first.

    ``log_likelihood (B, K)``: the score of the rotation after the shift reduction (the best
    shift's, or the log-sum over shifts), shift log prior included; ``rotation_index (B, K)``
    into the rotations; ``shift_index (B, K)`` into the (per-particle) shifts, the best shift of
    that rotation; ``log_evidence (B,)``: with ``reduce="logsumexp"``, the log-sum over all
    rotations and shifts (else None).
    """

    log_likelihood: Tensor
    rotation_index: Tensor
    shift_index: Tensor
    log_evidence: Tensor | None = None


def band_mask(freq_px: Tensor, radius_px: float) -> Tensor:
    """``(P,)`` bool: the frequencies ``(P, 2)`` (Fourier-index units) with ``|k| ≤ radius_px``."""
    return (freq_px**2).sum(-1) <= radius_px**2


def restrict_to_band(mask: Tensor, images_ft: Tensor, ctf: Tensor, weight: Tensor, freq_px: Tensor,
                     freq_invA: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Keep the ``mask`` frequencies of ``(B, P)`` images and CTFs, ``(P,)``/``(B, P)`` weights and
    ``(P, 2)`` frequencies, in that order."""
    return images_ft[..., mask], ctf[..., mask], weight[..., mask], freq_px[mask], freq_invA[mask]


def log_likelihoods(images_ft: Tensor, ctf: Tensor, weight: Tensor, projections: Tensor,
                    phases: Tensor, scale_profiled: bool = False) -> Tensor:
    """Log-likelihood of every (particle, shift, rotation), per-particle constant dropped.

    Args:
        images_ft: ``(B, P)`` complex half-disc image values.
        ctf: ``(B, P)`` real CTFs.
        weight: ``(P,)`` or ``(B, P)`` real ``m_k / σ²_k``.
        projections: ``(J, P)`` complex slices.
        phases: ``(T, P)`` or ``(B, T, P)`` complex ``exp(+2πi k · t)`` (:func:`phase_ramps`).
        scale_profiled: return ``max(cross, 0)² / (2 norm)``, the log-likelihood maximised over
            an unknown image scale ``s ≥ 0`` (peak at ``s = cross / norm``), instead.

    Returns:
        ``(B, T, J)`` real scores in the real dtype of ``images_ft``.
    """
    image_side, ctf2_weight = _image_side(images_ft, ctf, weight, phases)
    cross, norm = _cross_and_norm(image_side, ctf2_weight, projections.to(images_ft.dtype))
    return _finish(cross.view(images_ft.shape[0], -1, projections.shape[0]), norm[:, None, :], scale_profiled)


def score_poses(volume_ft: Tensor, rotations: Tensor, shifts_A: Tensor, images_ft: Tensor, ctf: Tensor,
                weight: Tensor, freq_px: Tensor, freq_invA: Tensor, *, interp: Interp = "trilinear",
                top_k: int = 8, reduce: Reduce = "max", scale_profiled: bool = False,
                log_prior: Tensor | None = None, chunk_rotations: int | None = None,
                max_block_elements: int = 2**24) -> TopPoses:
    """Score all rotations × shifts of a batch against a map and keep the ``top_k`` best rotations.

    Args:
        volume_ft: ``(n, n, n // 2 + 1)`` complex rfft half-grid map.
        rotations: ``(J, 3, 3)`` RELION rotation matrices.
        shifts_A: ``(T, 2)`` origins in Å shared by the batch, or ``(B, T, 2)`` per particle.
        images_ft, ctf, weight: ``(B, P)`` complex, ``(B, P)`` real, ``(P,)`` or ``(B, P)`` real
            (see :func:`log_likelihoods`), on the frequencies ``freq_px`` / ``freq_invA`` ``(P, 2)``.
        top_k: rotations kept per particle (at most ``J``).
        reduce: over shifts, ``"max"`` (best shift) or ``"logsumexp"`` (shifts marginalised).
        scale_profiled: score with the scale-profiled log-likelihood (see :func:`log_likelihoods`).
        log_prior: ``(T,)`` or ``(B, T)`` log prior of each shift, added before the reduction.
        chunk_rotations: rotations per chunk; default from ``max_block_elements`` (module notes).

    Returns:
        :class:`TopPoses` with ``(B, min(top_k, J))`` entries, sorted best first.
    """
    if reduce not in ("max", "logsumexp"):
        raise ValueError(f"reduce must be 'max' or 'logsumexp', not {reduce!r}")
    batch, shifts = images_ft.shape[0], shifts_A.shape[-2]
    image_side, ctf2_weight = _image_side(images_ft, ctf, weight, phase_ramps(freq_invA, shifts_A))
    prior = None if log_prior is None else log_prior.to(ctf2_weight.dtype).expand(batch, shifts)
    chunk = chunk_rotations or max(1, max_block_elements // (batch * shifts + 32 * freq_px.shape[0]))
    real_dtype = volume_ft.real.dtype
    points = freq_px.to(real_dtype)
    best = _empty_top(batch, ctf2_weight)
    log_evidence = ctf2_weight.new_full((batch,), -torch.inf)
    for start in range(0, rotations.shape[0], chunk):
        projections = extract(volume_ft, rotations[start:start + chunk].to(real_dtype), points, interp)
        cross, norm = _cross_and_norm(image_side, ctf2_weight, projections.to(images_ft.dtype))
        scores, shift_index = _reduce_shifts(cross.view(batch, shifts, -1), norm, prior, reduce, scale_profiled)
        rotation_index = torch.arange(start, start + scores.shape[1], device=scores.device).expand(batch, -1)
        best = _merge_top(best, (scores, rotation_index, shift_index), top_k)
        if reduce == "logsumexp":
            log_evidence = torch.logaddexp(log_evidence, torch.logsumexp(scores, 1))
    return TopPoses(*best, log_evidence if reduce == "logsumexp" else None)


def posterior_weights(log_likelihood: Tensor, temperature: float = 1.0, mass: float = 0.999,
                      particle_ids: Tensor | None = None) -> Tensor:
    """``(B, K)`` weights ``softmax(LL / temperature)`` over the kept poses' ``(B, K)``
    log-likelihoods (e.g. :attr:`TopPoses.log_likelihood`), pruned and renormalised.

    Per particle, only the smallest set of poses holding ``mass`` of the softmax keeps its
    weight; the others get 0. A score of −inf is an impossible pose (weight 0); NaN, +inf or
    a particle with no finite score raise :class:`cryosgd.errors.InputError` naming the
    particle (its row, or ``particle_ids[row]``).
    """
    if not temperature > 0 or not 0 < mass <= 1:
        raise ValueError(f"posterior weights: temperature {temperature} must be > 0 and mass {mass} in (0, 1]")
    scores = log_likelihood
    bad = scores.isnan().any(1) | (scores == torch.inf).any(1) | (scores == -torch.inf).all(1)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        name = row if particle_ids is None else int(particle_ids[row])
        raise InputError(None, f"particle {name}: no finite pose score to weight ({scores[row].tolist()}); "
                               f"{int(bad.sum())} such particle(s) in the batch")
    weights = torch.softmax(scores / temperature, dim=1)
    ordered, order = weights.sort(dim=1, descending=True)
    keep_ordered = (ordered.cumsum(1) - ordered) < mass
    keep = torch.zeros_like(keep_ordered).scatter(1, order, keep_ordered)
    pruned = torch.where(keep, weights, torch.zeros_like(weights))
    return pruned / pruned.sum(1, keepdim=True)


def _image_side(images_ft: Tensor, ctf: Tensor, weight: Tensor, phases: Tensor) -> tuple[Tensor, Tensor]:
    """``(B·T, 2P)`` real ``[Re ã, −Im ã]`` with ``ã = w C conj(X) e^{2πik·t}``, and ``(B, P)`` ``w C²``."""
    real_dtype = images_ft.real.dtype
    ctf, weight = ctf.to(real_dtype), weight.to(real_dtype)
    a = (weight * ctf * images_ft.conj())[:, None, :] * phases.to(images_ft.dtype)
    batch, shifts, points = images_ft.shape[0], a.shape[-2], images_ft.shape[1]
    image_side = torch.cat([a.real, -a.imag], -1).reshape(batch * shifts, 2 * points)
    return image_side, (weight * ctf**2).expand(batch, points)


def _cross_and_norm(image_side: Tensor, ctf2_weight: Tensor, projections: Tensor) -> tuple[Tensor, Tensor]:
    """The two GEMMs: ``(B·T, J)`` cross terms and ``(B, J)`` norms ``Σ w C² |P_j|²``."""
    stacked = torch.cat([projections.real, projections.imag], -1)
    cross = image_side @ stacked.T
    norm = ctf2_weight @ (projections.real**2 + projections.imag**2).T
    return cross, norm


def _finish(cross: Tensor, norm: Tensor, scale_profiled: bool) -> Tensor:
    """Score from the two terms: ``cross − ½ norm``, or ``max(cross, 0)² / (2 norm)`` profiled."""
    if scale_profiled:
        return cross.clamp(min=0) ** 2 / (2 * norm.clamp(min=torch.finfo(norm.dtype).tiny))
    return cross - 0.5 * norm


def _reduce_shifts(cross: Tensor, norm: Tensor, prior: Tensor | None, reduce: Reduce,
                   scale_profiled: bool) -> tuple[Tensor, Tensor]:
    """``(B, T, J_c)`` cross terms, ``(B, J_c)`` norms → ``(B, J_c)`` scores and best-shift indices.

    Element-wise passes over the block are kept few: ``−½ norm`` does not depend on the
    shift, so it is added after the reduction, and the profiled score increases with ``cross``,
    so without a prior its maximum is taken on ``cross`` first.
    """
    profile_after = scale_profiled and prior is None and reduce == "max"
    scores = _finish(cross, norm[:, None, :], True) if scale_profiled and not profile_after else cross
    if prior is not None:
        scores = scores + prior[:, :, None]
    best, index = scores.max(1)
    if reduce == "logsumexp":
        finite_best = torch.where(best.isfinite(), best, torch.zeros_like(best))
        best = finite_best + (scores - finite_best[:, None, :]).exp_().sum(1).log_()
    if not scale_profiled:
        return best - 0.5 * norm, index
    return (_finish(best, norm, True) if profile_after else best), index


def _empty_top(batch: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    empty_index = torch.empty(batch, 0, dtype=torch.long, device=like.device)
    return like.new_empty(batch, 0), empty_index, empty_index


def _merge_top(best: tuple[Tensor, Tensor, Tensor], chunk: tuple[Tensor, Tensor, Tensor],
               top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Running top-K: the ``top_k`` best of the kept and the new (score, rotation, shift) columns."""
    scores, rotation, shift = (torch.cat([b, c], 1) for b, c in zip(best, chunk))
    kept, order = scores.topk(min(top_k, scores.shape[1]), dim=1)
    return kept, rotation.gather(1, order), shift.gather(1, order)
