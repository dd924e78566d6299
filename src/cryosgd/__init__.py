"""cryosgd: cryo-EM 3D reconstruction by preconditioned stochastic gradient descent.

The Python API does what the ``cryosgd`` command does::

    import cryosgd
    result = cryosgd.reconstruct("particles.star", "recon/")       # maps, FSC, plots, checkpoints
    print(result.resolution_A)

and exposes the pieces::

    table = cryosgd.read_particles("particles.star")
    stack = cryosgd.ImageStack(table)
    grid = cryosgd.FourierGrid.create(stack.box_px, table.pixel_A, work_box_px=64)
    store = cryosgd.ParticleStore(stack, grid)                       # FFT'd, cropped images
    batch = cryosgd.make_batch(table, range(256), store)
    predicted = cryosgd.ForwardModel(grid).forward(volume_ft, batch)

Names are imported on first use, so ``import cryosgd`` is cheap (no torch until needed).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "cryosgd.api": ("demo", "fsc", "hessian", "project", "reconstruct", "simulate"),
    "cryosgd.conventions": ("euler_to_matrix", "ft_to_map", "map_to_ft", "matrix_to_euler"),
    "cryosgd.data.batch": ("Batch", "CTFParams", "batch_indices", "make_batch"),
    "cryosgd.data.particles": ("OpticsGroup", "ParticleTable", "read_particles", "write_particles"),
    "cryosgd.data.stack": ("ImageStack",),
    "cryosgd.data.store": ("ParticleStore",),
    "cryosgd.errors": ("InputError",),
    "cryosgd.fourier.grids": ("FourierGrid",),
    "cryosgd.fourier.slice": ("extract", "insert"),
    "cryosgd.io.mrc": ("read_map", "write_map"),
    "cryosgd.model.forward": ("ForwardModel",),
    "cryosgd.recon.settings": ("ReconstructionSettings",),
    "cryosgd.sim.simulate": ("SimulationSettings",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)
__version__ = "0.2.0"


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'cryosgd' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
