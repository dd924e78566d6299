"""Post-processing of two half maps, as ``relion_postprocess`` (RELION 3.1) does it.

Maps are real-space ``[z, y, x]`` arrays with the centre at voxel ``n // 2``; shells and FSCs
are RELION's (:mod:`cryosgd.fourier.fsc`: shell ``i`` holds the frequencies whose radius rounds
to ``i``, at resolution ``box · voxel / i`` Å). The steps, with the option of
``relion_postprocess`` (or ``relion_mask_create``) each one reproduces:

1. Mask (:func:`auto_mask`, when no mask is given; RELION 3.1 makes it with
   ``relion_mask_create``). The joint map (the average of the halves) is low-passed to
   ``lowpass_A`` = 15 Å (``--lowpass 15``, RELION's filter: :func:`low_pass_at_shell`) and
   thresholded (``--ini_threshold``, which RELION needs from the user; here
   :func:`auto_threshold`: the larger of 4 σ of the noise, from the half maps' difference, and
   5 % of the way from the solvent level to the maximum). Of the voxels above it, blobs whose
   peak is not twice as far above the solvent as the threshold are dropped (RELION keeps them).
   The rest is extended by ``extend_px`` (``--extend_inimask``) and given a raised-cosine edge
   of ``soft_edge_px`` (``--width_soft_edge``), by exact Euclidean distances as RELION does.
   Defaults: RELION's GUI's 3 and 6 px at voxels of 1 Å or more; at finer voxels 3 Å and 6 Å,
   so that a mask does not hug the density more tightly when the map is sampled more finely.
   With the same threshold, the mask differs from ``relion_mask_create``'s by 0.004 on average
   (the test ``test_auto_mask_matches_relion_mask_create``).
2. Corrected FSC (:func:`masked_fsc`; Chen et al. 2013). ``fsc_unmasked`` of the halves;
   ``fsc_masked`` of the masked halves; both halves' phases replaced by uniform random ones
   (a seeded generator; ``--random_seed``) at every frequency of radius ≥ ``randomize_at``, the
   first shell > 0 where ``fsc_unmasked`` < 0.8 (``--randomize_at_fsc 0.8``), then masked:
   ``fsc_random``. ``fsc_corrected`` is ``fsc_masked`` below shell ``randomize_at + 2`` and
   ``(fsc_masked − fsc_random) / (1 − fsc_random)`` from there (RELION starts the correction
   two shells beyond the randomisation, to skip artefacts at its edge). The resolution is that
   of the last shell before ``fsc_corrected`` first drops below 0.143. If the unmasked FSC
   reaches further, the unmasked FSC is used instead, as RELION does without ``--force_mask``.
3. Weighting and B-factor (:func:`sharpen`; ``--auto_bfac``). The Fourier transform of the
   *unmasked* joint map is multiplied per shell by ``√(2 FSC / (1 + FSC))`` of the corrected
   FSC (Rosenthal & Henderson 2003; ``--skip_fsc_weighting`` off), zero from the first shell
   where the FSC is below 10⁻⁴. Its Guinier plot is ln(mean |F|) per shell against s² = 1/d²
   (Å⁻²), shells 1 to Nyquist. A least-squares line through the shells with
   ``autob_highres_A ≤ d ≤ autob_lowres_A`` (``--autob_lowres 10``, ``--autob_highres``) gives
   the slope; B = 4 · slope (Å², negative for a map that needs sharpening, as RELION's
   ``_rlnBfactorUsedForSharpening``). ``autob_highres_A`` defaults to the resolution.
   RELION's default, 0, fits every shell to Nyquist whose weighted amplitude is not zero, i.e.
   up to the first shell where the corrected FSC falls below 10⁻⁴; the shells between the
   resolution and that one carry mostly noise, and where it falls depends on the random phases:
   on the test's half maps RELION gives −84 Å² with its default and −90 Å² when it fits to the
   resolution; cryosgd, over three seeds, −71 to −91 Å² with RELION's default and −88 to −89 Å²
   with its own (``python benchmarks/postprocess_vs_relion.py``).
4. Sharpening. The weighted transform is multiplied by ``exp(−B s² / 4)`` (amplitudes grow
   with s when B < 0) up to Nyquist and zeroed beyond, which flattens the Guinier plot over the
   fit range. No MTF (``--mtf``) is divided out. Last, a raised-cosine low-pass from one shell
   below the resolution's shell to one above (``--low_pass -1``, ``--filter_edge_width 2``);
   ``relion_postprocess``'s default, ``--low_pass 0``, skips it.

What ``relion_postprocess`` writes as ``postprocess.mrc`` is ``map_sharpened.mrc`` here, and
``postprocess_masked.mrc`` is ``map_sharpened_masked.mrc``. The test
``tests/test_postprocess.py::test_resolution_and_bfactor_match_relion_postprocess`` and
``python benchmarks/postprocess_vs_relion.py`` compare the two programs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryosgd.conventions import ft_to_map, map_to_ft
from cryosgd.errors import InputError
from cryosgd.fourier.fsc import FSCCurve, fsc_of_ft
from cryosgd.fourier.grids import shell_index, voxel_multiplicity
from cryosgd.fourier.maps import low_pass_ft
from cryosgd.io.atomic import write_lines
from cryosgd.io.mrc import check_voxel_size, read_map, write_map
from cryosgd.report import save_curves, save_fsc_plot

RANDOMIZE_AT_FSC = 0.8
RESOLUTION_FSC = 0.143
_FEW_SHELLS = 5  # a Guinier fit on fewer shells is flagged in the summary


def low_pass_at_shell(volume_ft: Tensor, box_px: int, voxel_A: float, resolution_A: float) -> Tensor:
    """RELION's ``lowPassFilterMap`` (edge width 2): a raised cosine from 1 at shell ``i − 1``
    to 0 at shell ``i + 1``, where ``i = round(box · voxel / resolution_A)``."""
    shell = round(box_px * voxel_A / resolution_A)
    return low_pass_ft(volume_ft, box_px, voxel_A, box_px * voxel_A / max(shell - 1, 1e-6), edge_shells=2)


def auto_threshold(low_passed: Tensor, noise: Tensor | None = None) -> tuple[float, float]:
    """(solvent level, threshold) at which :func:`auto_mask` cuts a low-passed map.

    The solvent level is the median (solvent fills most of a box). The noise σ is the standard
    deviation of ``noise`` (the same low-pass of a map with the joint map's noise and no signal,
    such as half the difference of the half maps), else 1.4826 × the median absolute deviation
    of the map (which the density's own tails inflate when it fills much of the box). The
    threshold is the larger of level + 4 σ (noise blobs rarely reach it) and 5 % of the way
    from the level to the map's maximum (for clean maps: the low-pass's ripples stay below it,
    the periphery of the density does not).
    """
    values = low_passed.reshape(-1).to(torch.float64)
    level = values.median()
    sigma = 1.4826 * (values - level).abs().median() if noise is None else noise.to(torch.float64).std()
    return float(level), float(level + torch.maximum(4 * sigma, 0.05 * (values.max() - level)))


def auto_mask(joint_map: Tensor | np.ndarray, voxel_A: float, lowpass_A: float = 15.0,
              threshold: float | None = None, extend_px: float | None = None,
              soft_edge_px: float | None = None, *, noise_map: Tensor | np.ndarray | None = None) -> Tensor:
    """A soft ``[z, y, x]`` float64 mask in [0, 1] around the density of ``joint_map``.

    The joint map is low-passed to ``lowpass_A`` (:func:`low_pass_at_shell`); the seed is its
    voxels at or above ``threshold`` (map units; default :func:`auto_threshold`, with
    ``noise_map``, e.g. (half1 − half2) / 2, low-passed alike for the noise level) that belong
    to a 26-connected blob whose peak is at least twice as far above the solvent level (the
    median) as the threshold, or that holds the map's maximum. Voxels closer than ``extend_px``
    to the seed join it; voxels closer than ``soft_edge_px`` to that get the raised cosine
    ``½ + ½ cos(π d / soft_edge_px)`` of their distance d (``relion_mask_create``'s
    ``--extend_inimask`` and ``--width_soft_edge``). These default to ``max(3, 3 Å / voxel)``
    and ``max(6, 6 Å / voxel)`` voxels.
    """
    volume = torch.as_tensor(joint_map, dtype=torch.float64)
    n = volume.shape[0]

    def smoothed(v: Tensor) -> Tensor:
        return ft_to_map(low_pass_at_shell(map_to_ft(v), n, voxel_A, lowpass_A), n)

    smooth = smoothed(volume)
    noise = None if noise_map is None else smoothed(torch.as_tensor(noise_map, dtype=torch.float64))
    level, cut = auto_threshold(smooth, noise)
    cut = cut if threshold is None else float(threshold)
    labels = connected_components(smooth >= cut)
    if not labels.any():
        raise InputError(None, f"mask threshold {cut:.4g}: no voxel of the low-passed map reaches it")
    peaks = torch.zeros(int(labels.max()) + 1, dtype=torch.float64).scatter_reduce(
        0, labels.reshape(-1), smooth.reshape(-1), "amax")
    peaks[0] = -math.inf
    seed = (peaks >= min(2 * cut - level, float(smooth.max())))[labels]
    extend = max(3.0, 3.0 / voxel_A) if extend_px is None else float(extend_px)
    edge = max(6.0, 6.0 / voxel_A) if soft_edge_px is None else float(soft_edge_px)
    extended = distance_to(seed, extend) < extend if extend > 0 else seed
    distance = distance_to(extended, edge)
    soft = torch.where(distance < edge, 0.5 + 0.5 * torch.cos(math.pi * distance / max(edge, 1e-12)), 0.0)
    return torch.where(extended, 1.0, soft)


def connected_components(binary: Tensor) -> Tensor:
    """Labels (int64 ``[z, y, x]``, 0 outside) of the 26-connected components of a boolean volume.

    Every voxel starts with its own label and takes the largest label of its run along each
    axis and of its 3×3×3 neighbours inside the volume, until nothing changes (a flood fill),
    within the bounding box of the True voxels. Labels are not consecutive.
    """
    labels = torch.zeros(binary.shape, dtype=torch.int64)
    if not binary.any():
        return labels
    where = binary.nonzero()
    lo, hi = where.amin(0), where.amax(0) + 1
    inside = binary[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    crop = torch.arange(1, inside.numel() + 1).reshape(inside.shape) * inside
    while True:
        grown = crop
        for axis in range(3):
            grown = _run_max(grown, inside, axis)
        pooled = torch.nn.functional.max_pool3d(grown[None, None].double(), 3, stride=1, padding=1)[0, 0]
        grown = pooled.long() * inside
        if torch.equal(grown, crop):
            break
        crop = grown
    labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = crop
    return labels


def _run_max(labels: Tensor, inside: Tensor, axis: int) -> Tensor:
    """Every voxel of a run of True voxels along ``axis`` takes the run's largest (int64) label:
    a running maximum forwards then backwards, restarted at every False voxel."""
    for _ in range(2):
        run = torch.cumsum(~inside, axis)
        big = int(labels.max()) + 1
        labels = (run * big + labels).cummax(axis).values - run * big
        labels, inside = labels.flip(axis), inside.flip(axis)
    return labels * inside


def distance_to(binary: Tensor, max_px: float) -> Tensor:
    """Euclidean distance (voxels) of every voxel to the nearest True voxel, exact up to
    ``max_px`` and ``inf`` beyond; separable: a minimum of ``f + offset²`` along each axis."""
    reach = int(math.floor(max_px))
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    squared = torch.where(binary, torch.zeros((), dtype=torch.float64), inf)
    for axis in range(3):
        n = squared.shape[axis]
        pad = [0, 0] * 3
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = reach
        padded = torch.nn.functional.pad(squared, pad, value=float("inf"))
        squared = padded.narrow(axis, reach, n).clone()
        for offset in range(1, reach + 1):
            nearest = torch.minimum(padded.narrow(axis, reach - offset, n), padded.narrow(axis, reach + offset, n))
            squared = torch.minimum(squared, nearest + offset**2)
    distance = squared.sqrt()
    return torch.where(distance <= max_px, distance, inf)


def radius_squared(box_px: int) -> Tensor:
    """``(n, n, n // 2 + 1)`` float64 squared frequency radius (Fourier-index units) of the half-grid."""
    k = torch.fft.fftfreq(box_px, 1 / box_px, dtype=torch.float64)
    kx = torch.arange(box_px // 2 + 1, dtype=torch.float64)
    return k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2


def randomize_phases(volume: Tensor, from_shell: int, generator: torch.Generator) -> Tensor:
    """The real-space map with uniform random phases at every frequency of radius ≥ ``from_shell``
    (Fourier-index units), amplitudes kept (RELION's ``randomizePhasesBeyond``)."""
    n = volume.shape[0]
    volume_ft = map_to_ft(volume.to(torch.float64))
    beyond = radius_squared(n) >= from_shell**2
    phases = 2 * math.pi * torch.rand(volume_ft.shape, generator=generator, dtype=torch.float64)
    randomized = torch.polar(volume_ft.abs(), phases)
    return ft_to_map(torch.where(beyond, randomized, volume_ft), n)


@dataclass(frozen=True)
class MaskedFSC:
    """The four FSC curves of :func:`masked_fsc` and the shell phases were randomised from."""

    unmasked: FSCCurve
    masked: FSCCurve
    random: FSCCurve
    corrected: FSCCurve
    randomize_at: int

    @property
    def resolution_A(self) -> float:
        """Resolution (Å) at which the corrected FSC first drops below 0.143."""
        return self.corrected.resolution_at(RESOLUTION_FSC)


def masked_fsc(half1: Tensor | np.ndarray, half2: Tensor | np.ndarray, mask: Tensor | np.ndarray, voxel_A: float,
               *, randomize_at_fsc: float = RANDOMIZE_AT_FSC, seed: int = 0) -> MaskedFSC:
    """The mask-corrected FSC of two half maps by phase randomisation (module docstring, step 2).

    Raises ``InputError`` when the unmasked FSC never drops below ``randomize_at_fsc``.
    """
    a, b = (torch.as_tensor(v, dtype=torch.float64) for v in (half1, half2))
    m = torch.as_tensor(mask, dtype=torch.float64)
    n = a.shape[0]

    def curve(x: Tensor, y: Tensor) -> np.ndarray:
        return fsc_of_ft(map_to_ft(x), map_to_ft(y), n)

    unmasked, masked = curve(a, b), curve(a * m, b * m)
    below = np.nonzero(unmasked[1:] < randomize_at_fsc)[0]
    if len(below) == 0:
        raise InputError(None, f"the unmasked half-map FSC never drops below {randomize_at_fsc}: are the two "
                               "half maps the same map, or refined together?")
    randomize_at = int(below[0]) + 1
    generator = torch.Generator().manual_seed(seed)
    random = curve(randomize_phases(a, randomize_at, generator) * m, randomize_phases(b, randomize_at, generator) * m)
    masked[0] = masked[0] if masked[0] > 0 else 1.0
    random[0] = random[0] if random[0] > 0 else 1.0
    corrected = masked.copy()
    tail = slice(randomize_at + 2, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        corrected[tail] = (masked[tail] - random[tail]) / (1 - random[tail])
    curves = [FSCCurve(c, n, voxel_A) for c in (unmasked, masked, random, corrected)]
    return MaskedFSC(*curves, randomize_at)


def guinier(volume_ft: Tensor, box_px: int, voxel_A: float) -> tuple[np.ndarray, np.ndarray]:
    """Guinier plot of a half-grid map: s² (Å⁻²) and ln(mean |F| / box³) of shells 1 … box/2.

    Shells whose amplitudes are all zero get ln = −inf.
    """
    shells = shell_index(box_px).reshape(-1)
    weight = voxel_multiplicity(volume_ft.shape, dtype=torch.float64).reshape(-1)
    keep = shells <= box_px // 2
    total = torch.bincount(shells[keep], (weight * volume_ft.abs().reshape(-1).double())[keep], box_px // 2 + 1)
    count = torch.bincount(shells[keep], weight[keep], box_px // 2 + 1)
    with np.errstate(divide="ignore"):
        ln_amplitude = np.log((total / count).numpy() / box_px**3)
    shell = np.arange(box_px // 2 + 1)
    return (shell / (box_px * voxel_A)) ** 2, ln_amplitude


@dataclass(frozen=True)
class GuinierFit:
    """A line ``ln|F| = intercept + slope · s²`` through the shells ``used`` (bool per shell)."""

    slope: float
    intercept: float
    used: np.ndarray

    @property
    def bfactor_A2(self) -> float:
        return 4 * self.slope


def fit_guinier(s2_invA2: np.ndarray, ln_amplitude: np.ndarray, lowres_A: float = 10.0,
                highres_A: float = 0.0) -> GuinierFit:
    """Least-squares line through the Guinier points of shells ≥ 1 with resolution in
    [``highres_A``, ``lowres_A``] and a finite ln amplitude (RELION's ``fitStraightLine``).
    With fewer than two such shells (a map whose resolution is coarser than ``lowres_A``) there
    is no line: slope 0 (B = 0, no sharpening), intercept NaN, no shell used."""
    with np.errstate(divide="ignore"):
        resolution_A = 1 / np.sqrt(s2_invA2)
    within = (resolution_A <= lowres_A * (1 + 1e-9)) & (resolution_A >= highres_A * (1 - 1e-9))
    used = (s2_invA2 > 0) & within & np.isfinite(ln_amplitude)
    if used.sum() < 2:
        return GuinierFit(0.0, math.nan, np.zeros_like(used))
    slope, intercept = np.polyfit(s2_invA2[used], ln_amplitude[used], 1)
    return GuinierFit(float(slope), float(intercept), used)


def fsc_weights(fsc_curve: np.ndarray) -> np.ndarray:
    """Per-shell ``√(2 FSC / (1 + FSC))``, 0 where FSC ≤ 0 and from the first shell where it is
    below 10⁻⁴ on (RELION's ``applyFscWeighting``)."""
    weights = np.sqrt(np.clip(2 * fsc_curve / (1 + fsc_curve), 0, None))
    low = np.nonzero(~(fsc_curve >= 1e-4))[0]
    if len(low):
        weights[max(low[0], 1):] = 0.0
    return weights


def apply_per_shell(volume_ft: Tensor, box_px: int, per_shell: np.ndarray) -> Tensor:
    """Multiply every half-grid voxel by the value of its shell (0 beyond the last shell)."""
    shells = shell_index(box_px, volume_ft.device)
    table = torch.zeros(int(shells.max()) + 1, dtype=torch.float64)
    table[:len(per_shell)] = torch.as_tensor(per_shell, dtype=torch.float64)
    return volume_ft * table[shells]


def apply_bfactor(volume_ft: Tensor, box_px: int, voxel_A: float, bfactor_A2: float) -> Tensor:
    """Multiply by ``exp(−B s² / 4)`` (s in Å⁻¹) up to Nyquist, zero beyond."""
    radius2 = radius_squared(box_px)
    s2 = radius2 / (box_px * voxel_A) ** 2
    factor = torch.exp(-bfactor_A2 * s2 / 4) * (radius2 <= (box_px / 2) ** 2)
    return volume_ft * factor


@dataclass(frozen=True)
class Sharpened:
    """The sharpened map, the B-factor fit and the Guinier plots (ln|F| per shell)."""

    volume: Tensor
    fit: GuinierFit
    s2_invA2: np.ndarray
    ln_amplitude: np.ndarray
    ln_amplitude_weighted: np.ndarray
    ln_amplitude_sharpened: np.ndarray


def sharpen(joint_map: Tensor | np.ndarray, fsc_curve: FSCCurve, *, resolution_A: float | None = None,
            autob_lowres_A: float = 10.0, autob_highres_A: float | None = None,
            low_pass_A: float | None = None) -> Sharpened:
    """FSC-weight, fit the B-factor on the weighted Guinier plot, sharpen and low-pass the
    (unmasked) joint map (module docstring, steps 3–4).

    ``resolution_A`` defaults to the FSC's 0.143 resolution. ``autob_highres_A``: None fits up
    to ``resolution_A``, 0 up to Nyquist. ``low_pass_A``: None filters at ``resolution_A``,
    0 not at all.
    """
    volume = torch.as_tensor(joint_map, dtype=torch.float64)
    n, voxel_A = volume.shape[0], fsc_curve.pixel_A
    volume_ft = map_to_ft(volume)
    s2, ln_in = guinier(volume_ft, n, voxel_A)
    weighted_ft = apply_per_shell(volume_ft, n, fsc_weights(fsc_curve.fsc))
    _, ln_weighted = guinier(weighted_ft, n, voxel_A)
    resolution_A = fsc_curve.resolution_at(RESOLUTION_FSC) if resolution_A is None else resolution_A
    fit = fit_guinier(s2, ln_weighted, autob_lowres_A, resolution_A if autob_highres_A is None else autob_highres_A)
    sharpened_ft = apply_bfactor(weighted_ft, n, voxel_A, fit.bfactor_A2)
    _, ln_sharpened = guinier(sharpened_ft, n, voxel_A)
    cutoff_A = resolution_A if low_pass_A is None else low_pass_A
    if cutoff_A:
        sharpened_ft = low_pass_at_shell(sharpened_ft, n, voxel_A, cutoff_A)
    return Sharpened(ft_to_map(sharpened_ft, n), fit, s2, ln_in, ln_weighted, ln_sharpened)


@dataclass(frozen=True)
class PostprocessResult:
    """What :func:`postprocess` found and wrote."""

    resolution_A: float
    bfactor_A2: float
    fsc: MaskedFSC
    fsc_used: FSCCurve
    fit_shells: int  # the shells the Guinier fit used
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def fsc_source(self) -> str:
        """Which FSC the resolution was read from, in words."""
        if self.fsc_used is self.fsc.corrected:
            return "corrected masked FSC 0.143"
        return "unmasked FSC 0.143; the mask made the corrected FSC worse"

    @property
    def summary(self) -> str:
        return (f"resolution {self.resolution_A:.2f} Å ({self.fsc_source}), "
                f"{bfactor_words(self.bfactor_A2, self.fit_shells)}, sharpened map: {self.paths['map_sharpened']}")


def bfactor_words(bfactor_A2: float, fit_shells: int | None = None) -> str:
    """The B-factor as the summaries give it (``"B-factor −89 Å²"``), flagged when the Guinier
    fit used fewer than ``_FEW_SHELLS`` shells, or why there is none (``fit_shells`` 0);
    ``fit_shells`` None: not known (an older run's record)."""
    if fit_shells == 0:
        return ("no B-factor (fewer than two shells between --autob-lowres and the resolution: FSC-weighted and "
                "low-passed, not sharpened)")
    few = fit_shells is not None and fit_shells < _FEW_SHELLS
    number = f"{bfactor_A2:.0f}".replace("-", "−")
    return f"B-factor {number} Å²" + (f" (fitted on {fit_shells} shells only: uncertain)" if few else "")


def read_inputs(half1_path: str | Path, half2_path: str | Path,
                mask_path: str | Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
    """Read and check two half maps and an optional mask: (half1, half2, mask, voxel Å)."""
    half1, voxel_A = read_map(half1_path)
    half2, voxel2_A = read_map(half2_path)
    if half1.shape[0] % 2 or half1.shape[0] < 8:
        raise InputError(half1_path, f"box of {half1.shape[0]} voxels: post-processing needs an even box of at "
                                     "least 8")
    if half2.shape != half1.shape:
        raise InputError(half2_path, f"shape {half2.shape} differs from {half1_path}'s {half1.shape}")
    check_voxel_size(half2_path, voxel2_A, voxel_A, f"{half1_path}'s")
    for path, data in ((half1_path, half1), (half2_path, half2)):
        if not data.any():
            raise InputError(path, "the map is all zero")
    mask = None
    if mask_path is not None:
        mask, mask_voxel_A = read_map(mask_path, need_voxel_size=False)
        if mask.shape != half1.shape:
            raise InputError(mask_path, f"mask shape {mask.shape} differs from the half maps' {half1.shape}")
        check_voxel_size(mask_path, mask_voxel_A, voxel_A, "the half maps'")
        if mask.min() < -1e-6 or mask.max() > 1 + 1e-6:
            raise InputError(mask_path, f"mask values from {mask.min():.4g} to {mask.max():.4g}: they must lie in "
                                        "[0, 1] (1 = protein, 0 = solvent)")
        if not mask.any():
            raise InputError(mask_path, "the mask is all zero")
    return half1, half2, mask, voxel_A


def postprocess(half1_path: str | Path, half2_path: str | Path, out_dir: str | Path,
                mask_path: str | Path | None = None, *, lowpass_A: float = 15.0, autob_lowres_A: float = 10.0,
                autob_highres_A: float | None = None, force_mask: bool = False, seed: int = 0) -> PostprocessResult:
    """``relion_postprocess --auto_bfac --low_pass -1`` on two half maps, into ``out_dir``.

    Without ``mask_path`` the mask is :func:`auto_mask` of the joint map (initial low-pass
    ``lowpass_A``) and is written as ``mask.mrc``. Writes (atomically) ``map_sharpened.mrc``,
    ``map_sharpened_masked.mrc``, ``fsc.csv``, ``fsc.png``, ``guinier.csv`` and ``guinier.png``.
    """
    half1, half2, mask, voxel_A = read_inputs(half1_path, half2_path, mask_path)
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    joint = (torch.as_tensor(half1, dtype=torch.float64) + torch.as_tensor(half2, dtype=torch.float64)) / 2
    automatic = mask is None
    if automatic:
        difference = (torch.as_tensor(half1, dtype=torch.float64) - torch.as_tensor(half2, dtype=torch.float64)) / 2
        mask = auto_mask(joint, voxel_A, lowpass_A, noise_map=difference).numpy()
    curves = masked_fsc(half1, half2, mask, voxel_A, seed=seed)
    unmasked_better = curves.unmasked.resolution_at(RESOLUTION_FSC) < curves.resolution_A
    used = curves.unmasked if unmasked_better and not force_mask else curves.corrected
    resolution_A = used.resolution_at(RESOLUTION_FSC)
    sharp = sharpen(joint, used, resolution_A=resolution_A, autob_lowres_A=autob_lowres_A,
                    autob_highres_A=autob_highres_A)
    if automatic:
        paths["mask"] = out_dir / "mask.mrc"
        write_map(paths["mask"], mask, voxel_A)
    paths["map_sharpened"] = out_dir / "map_sharpened.mrc"
    write_map(paths["map_sharpened"], sharp.volume.numpy(), voxel_A)
    paths["map_sharpened_masked"] = out_dir / "map_sharpened_masked.mrc"
    write_map(paths["map_sharpened_masked"], (sharp.volume * torch.as_tensor(mask, dtype=torch.float64)).numpy(),
              voxel_A)
    paths.update(write_tables(out_dir, curves, sharp))
    return PostprocessResult(resolution_A, sharp.fit.bfactor_A2, curves, used, int(sharp.fit.used.sum()), paths)


def write_tables(out_dir: Path, curves: MaskedFSC, sharp: Sharpened) -> dict[str, Path]:
    """``fsc.csv``, ``fsc.png``, ``guinier.csv`` and ``guinier.png``."""
    resolution_A = curves.unmasked.resolution_A
    rows = ["shell,resolution_A,fsc_unmasked,fsc_masked,fsc_random,fsc_corrected"]
    rows += [f"{i},{resolution_A[i]:.4f},{curves.unmasked.fsc[i]:.6f},{curves.masked.fsc[i]:.6f},"
             f"{curves.random.fsc[i]:.6f},{curves.corrected.fsc[i]:.6f}" for i in range(len(resolution_A))]
    paths = {"fsc_csv": write_lines(out_dir / "fsc.csv", rows)}
    paths["fsc_png"] = save_fsc_plot(out_dir / "fsc.png", {
        "corrected (masked, phase-randomised)": (curves.corrected, RESOLUTION_FSC),
        "unmasked": (curves.unmasked, RESOLUTION_FSC), "masked": (curves.masked, RESOLUTION_FSC),
        f"random phases from shell {curves.randomize_at}, masked": (curves.random, RESOLUTION_FSC)},
        "half-map FSC (RELION's mask correction)")
    fit = sharp.fit
    line = fit.intercept + fit.slope * sharp.s2_invA2  # NaN where there is no fit: an empty cell
    rows = ["s2_invA2,ln_amplitude,ln_amplitude_weighted,ln_amplitude_sharpened,fitted_line,used_in_fit"]
    rows += [f"{s2:.6g},{a:.6f},{b:.6f},{c:.6f},{'' if np.isnan(d) else f'{d:.6f}'},{int(u)}"
             for s2, a, b, c, d, u in zip(sharp.s2_invA2[1:], sharp.ln_amplitude[1:], sharp.ln_amplitude_weighted[1:],
                                          sharp.ln_amplitude_sharpened[1:], line[1:], fit.used[1:])]
    paths["guinier_csv"] = write_lines(out_dir / "guinier.csv", rows)
    finite = {label: np.where(np.isfinite(y), y, np.nan)[1:] for label, y in (
        ("joint map (unmasked)", sharp.ln_amplitude), ("FSC-weighted", sharp.ln_amplitude_weighted),
        ("sharpened", sharp.ln_amplitude_sharpened))}
    label = f"fit: B = {fit.bfactor_A2:.0f} Å²".replace("-", "−") if fit.used.any() else "no fit (too few shells)"
    finite[label] = np.where(fit.used, line, np.nan)[1:]
    paths["guinier_png"] = save_curves(out_dir / "guinier.png", sharp.s2_invA2[1:], finite, xlabel="s² (Å⁻²)",
                                       ylabel="ln(mean |F|)", title="Guinier plot")
    return paths
