"""Noise-free projections of a real-space map at the poses, shifts and CTFs of a STAR file.

The counterpart of ``relion_project --ctf``: the map is oversampled ``pad`` times in
Fourier space (zero-padded in real space after a gridding correction that undoes the
interpolation's real-space apodisation), sliced, shifted and CTF-modulated.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cryosgd.conventions import ft_to_images, map_to_ft
from cryosgd.data.batch import batch_indices, make_batch
from cryosgd.data.particles import ParticleTable, read_particles, write_particles
from cryosgd.data.stack import referenced_stacks
from cryosgd.errors import InputError
from cryosgd.fourier.grids import FourierGrid
from cryosgd.fourier.slice import Interp, apodization
from cryosgd.io.mrc import new_stack, read_map
from cryosgd.io.outputs import check_new_files
from cryosgd.model.forward import ForwardModel


def oversampled_ft(volume: torch.Tensor, pad: int, interp: Interp) -> torch.Tensor:
    """Gridding-corrected, ``pad``-times zero-padded map → rfft half-grid of box ``pad · n``.

    Trilinear (nearest) interpolation in Fourier space multiplies real space by
    sinc²(x / (pad·n)) (sinc); dividing by it first makes slices match true projections.
    """
    n = volume.shape[-1]
    m = pad * n
    profile = apodization(n, interp, pad, volume.dtype).to(volume.device)
    corrected = volume / (profile[:, None, None] * profile[None, :, None] * profile[None, None, :])
    padded = volume.new_zeros(m, m, m)
    lo = m // 2 - n // 2
    padded[lo:lo + n, lo:lo + n, lo:lo + n] = corrected
    return map_to_ft(padded)


def project_into(out: np.ndarray, volume: np.ndarray, voxel_A: float, table: ParticleTable, *,
                 interp: Interp = "trilinear", use_ctf: bool = True, pad: int = 2, batch_size: int = 256,
                 device: str | None = None) -> None:
    """Project ``volume`` (``[z, y, x]``, cubic) at every particle of ``table`` into ``out[i]``."""
    box = volume.shape[0]
    table.require_poses()
    if pad < 1:
        raise InputError(None, f"--pad {pad}: must be at least 1")
    if batch_size < 1:
        raise InputError(None, f"--batch-size {batch_size}: must be at least 1")
    if abs(table.pixel_A - voxel_A) > 1e-3 * voxel_A:
        raise InputError(table.source, f"rlnImagePixelSize {table.pixel_A} differs from the map's voxel size {voxel_A}")
    grid = FourierGrid.create(box, voxel_A)
    model = ForwardModel(grid, interp, use_ctf, pad)
    volume_ft = oversampled_ft(torch.as_tensor(volume, dtype=torch.float64, device=device), pad, interp)
    volume_ft = volume_ft.to(torch.complex64)
    for index in batch_indices(len(table), batch_size):
        batch = make_batch(table, index, device=device)
        images = ft_to_images(grid.put(model.forward(volume_ft, batch), box), box)
        out[index] = images.cpu().numpy()


def project(map_path: str | Path, star_path: str | Path, out_stack: str | Path, *, force: bool = False,
            **options) -> Path:
    """``cryosgd project``: write ``out_stack`` and a STAR 3.1 beside it that points at it.

    ``out_stack`` must be a new ``.mrcs`` (or ``.mrc``) file; the STAR takes its name with
    ``.star``. Neither may be an input (the map, the STAR, or a stack the STAR names), and
    neither may exist unless ``force``. ``options`` are those of :func:`project_into`.
    Returns the new STAR file's path.
    """
    out_stack = Path(out_stack)
    if out_stack.suffix.lower() not in (".mrcs", ".mrc"):
        raise InputError(out_stack, "-o: the output is an image stack and must end in .mrcs "
                                    "(the STAR file is written beside it)")
    out_star = out_stack.with_suffix(".star")
    volume, voxel_A = read_map(map_path)
    FourierGrid.create(volume.shape[0], voxel_A, source=map_path)
    table = read_particles(star_path, pixel_A=voxel_A, pixel_source=f"{map_path}'s voxel size")
    if options.get("use_ctf", True) and not table.has_ctf:
        raise InputError(star_path, "no CTF columns (rlnDefocusU …); project with --no-ctf, or add the CTFs")
    check_new_files([out_stack, out_star], [map_path, star_path, *referenced_stacks(table)], force)
    with new_stack(out_stack, len(table), volume.shape[0], voxel_A) as out:
        project_into(out, volume, voxel_A, table, **options)
    names = [f"{i + 1:06d}@{out_stack.name}" for i in range(len(table))]
    optics = [replace(g, pixel_A=voxel_A, box_px=volume.shape[0]) for g in table.optics]
    write_particles(out_star, replace(table, image_name=names, optics=optics))
    return out_star
