"""cryosgd: cryo-EM 3D reconstruction by preconditioned stochastic gradient descent.

The Python API does what the ``cryosgd`` command does::

    import cryosgd
    table = cryosgd.read_particles("particles.star")
    stack = cryosgd.ImageStack(table)
    grid = cryosgd.FourierGrid.create(stack.box_px, table.pixel_A, work_box_px=64)
    batch = cryosgd.make_batch(table, range(256), grid, stack)
    predicted = cryosgd.ForwardModel(grid).forward(volume_ft, batch)
"""

from cryosgd.conventions import euler_to_matrix, ft_to_map, map_to_ft, matrix_to_euler
from cryosgd.data.batch import Batch, batch_indices, make_batch
from cryosgd.data.particles import OpticsGroup, ParticleTable, read_particles, write_particles
from cryosgd.data.stack import ImageStack
from cryosgd.errors import InputError
from cryosgd.fourier.grids import FourierGrid
from cryosgd.fourier.slice import extract, insert
from cryosgd.io.mrc import read_map, write_map
from cryosgd.model.ctf import CTFParams
from cryosgd.model.forward import ForwardModel
from cryosgd.model.project import project, project_into
from cryosgd.model.simulate import SimulationSettings, simulate

__all__ = [
    "Batch", "CTFParams", "FourierGrid", "ForwardModel", "ImageStack", "InputError", "OpticsGroup",
    "ParticleTable", "SimulationSettings", "batch_indices", "euler_to_matrix", "extract", "ft_to_map",
    "insert", "make_batch", "map_to_ft", "matrix_to_euler", "project", "project_into", "read_map",
    "read_particles", "simulate", "write_map", "write_particles",
]
__version__ = "0.1.0"
