"""Rotations: HEALPix directions, RELION's global grid, rotation-vector maps, local grids.

Conventions
    Rotation matrices are RELION's (:mod:`cryosgd.conventions`): ``A = R_z(ψ) R_y(tilt) R_z(rot)``
    maps map-frame coordinates ``(x, y, z)`` to the image frame, and the image frequency
    ``(kx, ky)`` samples the map at ``Aᵀ (kx, ky, 0)``. The viewing direction of ``A``, in the
    map frame, is ``Aᵀ e_z`` (the third row of ``A``) = ``(sin θ cos φ, sin θ sin φ, cos θ)``
    with ``(θ, φ) = (tilt, rot)``.

    Rotation vectors ``v (…, 3)`` are axis × angle (radians); :func:`exp_map` gives the
    active rotation by ``|v|`` about ``v`` (Rodrigues), ``exp([0, 0, a]) = R_z(−a)`` in
    RELION's (passive) ``R_z``.

HEALPix (Górski et al. 2005, ApJ 622:759) in the NESTED scheme, written from the paper;
RELION's grid (``src/healpix_sampling.cpp``, described in /work/shared/POSES.md §3.2) pairs
each direction (rot = φ, tilt = θ) with ψ in steps of 360°/(6·2^order) from 0°.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryosgd.conventions import euler_to_matrix

# Face row ρ = f // 4 of the 12 base pixels gives the ring of the face's southern corner as
# (ρ + 2)·Nside; F is the longitude index of the face centre in units of π/4.
_FACE_F = (1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7)


@dataclass(frozen=True)
class RotationGrid:
    """A set of rotations with their Euler angles.

    ``matrices (J, 3, 3)`` RELION rotation matrices; ``angles_deg (J, 3)`` (rot, tilt, psi)
    in degrees; ``step_deg`` the angular step of the grid it was built with.
    """

    matrices: Tensor
    angles_deg: Tensor
    step_deg: float

    def __len__(self) -> int:
        return self.matrices.shape[0]

    def select(self, keep: Tensor) -> RotationGrid:
        """The rotations where the ``(J,)`` boolean ``keep`` is true (or at integer indices)."""
        return RotationGrid(self.matrices[keep], self.angles_deg[keep], self.step_deg)


def angular_step_deg(order: int) -> float:
    """RELION's angular step at HEALPix ``order``: 60°/2^order (30°, 15°, 7.5°, …)."""
    return 60.0 / 2**order


def _deinterleave(q: Tensor, order: int) -> tuple[Tensor, Tensor]:
    """In-face coordinates of nested index ``q``: x from the even bits, y from the odd bits."""
    x = torch.zeros_like(q)
    y = torch.zeros_like(q)
    for b in range(order):
        x |= ((q >> (2 * b)) & 1) << b
        y |= ((q >> (2 * b + 1)) & 1) << b
    return x, y


def healpix_directions(order: int, device=None, dtype=torch.float64) -> tuple[Tensor, Tensor]:
    """Centres of the HEALPix NESTED pixels for Nside = 2^order.

    Returns:
        ``theta_rad (Np,)`` colatitude in [0, π] and ``phi_rad (Np,)`` longitude in [0, 2π),
        ``Np = 12·4^order``, in nested pixel order: the children of pixel p at ``order + 1``
        are ``4p … 4p + 3``.
    """
    nside = 2**order
    pix = torch.arange(12 * nside**2, device=device)
    face = pix // nside**2
    x, y = _deinterleave(pix % nside**2, order)
    ring = (face // 4 + 2) * nside - x - y - 1                    # 1 … 4·Nside − 1, from the north
    north, south = ring < nside, ring > 3 * nside
    n_ring = torch.where(north, ring, torch.where(south, 4 * nside - ring, torch.full_like(ring, nside)))

    cap = n_ring.to(dtype) ** 2 / (3.0 * nside**2)                # 1 − |z| in the polar caps
    z_belt = 2.0 * (2 * nside - ring).to(dtype) / (3.0 * nside)
    z = torch.where(north, 1 - cap, torch.where(south, cap - 1, z_belt))
    sin_theta = torch.where(north | south, torch.sqrt(cap * (2 - cap)), torch.sqrt((1 - z) * (1 + z)))
    theta = torch.atan2(sin_theta, z)

    shifted = torch.where(north | south, torch.zeros_like(ring), (ring - nside) % 2)
    f = torch.tensor(_FACE_F, device=device)[face]
    j = (f * n_ring + x - y + 1 + shifted) // 2
    j = torch.where(j > 4 * n_ring, j - 4 * n_ring, torch.where(j < 1, j + 4 * n_ring, j))
    phi = (math.pi / 2) * (j.to(dtype) - (1 + shifted.to(dtype)) / 2) / n_ring.to(dtype)
    return theta, phi


def uniform_rotations(order: int, device=None, dtype=torch.float64) -> RotationGrid:
    """RELION's global rotation grid at HEALPix ``order``.

    Each HEALPix direction (rot = φ, tilt = θ) is paired with ψ = m·360°/(6·2^order),
    m = 0 … 6·2^order − 1; ``J = 72·8^order`` rotations (576, 4,608, 36,864 for orders 1–3),
    direction-major: rotation ``j`` has pixel ``j // n_psi`` and ψ index ``j % n_psi``.
    """
    theta, phi = healpix_directions(order, device, dtype)
    n_psi = 6 * 2**order
    psi = torch.arange(n_psi, device=device, dtype=dtype) * (360.0 / n_psi)
    n_dir = theta.shape[0]
    angles = torch.stack([torch.rad2deg(phi).repeat_interleave(n_psi), torch.rad2deg(theta).repeat_interleave(n_psi),
                          psi.repeat(n_dir)], -1)
    return RotationGrid(euler_to_matrix(angles), angles, angular_step_deg(order))


def _skew(v: Tensor) -> Tensor:
    """``(…, 3)`` → ``(…, 3, 3)`` cross-product matrix ``[v]×``."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([torch.stack([o, -z, y], -1), torch.stack([z, o, -x], -1), torch.stack([-y, x, o], -1)], -2)


def _vee(m: Tensor) -> Tensor:
    """Axial vector of the antisymmetric part of ``(…, 3, 3)`` matrices: ``½(M − Mᵀ) = [v]×``."""
    return 0.5 * torch.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0],
                              m[..., 1, 0] - m[..., 0, 1]], -1)


def exp_map(rotvec: Tensor) -> Tensor:
    """Rotation vectors ``(…, 3)`` (radians) → rotation matrices ``(…, 3, 3)`` (Rodrigues).

    ``R = I + sinc(θ)·[v]× + ½ sinc²(θ/2)·[v]×²``, θ = |v|, exact and smooth through θ = 0.
    """
    theta = torch.linalg.norm(rotvec, dim=-1)[..., None, None]
    k = _skew(rotvec)
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device)
    return eye + torch.sinc(theta / math.pi) * k + 0.5 * torch.sinc(theta / (2 * math.pi)) ** 2 * (k @ k)


def _angle_rad(rotations: Tensor) -> Tensor:
    """Rotation angle in [0, π] of ``(…, 3, 3)`` matrices, accurate near 0 and near π."""
    cos = 0.5 * (rotations.diagonal(dim1=-2, dim2=-1).sum(-1) - 1)
    return torch.atan2(torch.linalg.norm(_vee(rotations), dim=-1), cos)


def log_map(rotations: Tensor) -> Tensor:
    """Inverse of :func:`exp_map`: ``(…, 3, 3)`` → rotation vectors ``(…, 3)`` with |v| ≤ π.

    Below 90° the axis comes from the antisymmetric part (``sin θ · n``); above, from the
    symmetric part ``½(R + Rᵀ) − cos θ·I = (1 − cos θ)·n nᵀ``, its sign from the
    antisymmetric part (either sign at exactly π).
    """
    theta = _angle_rad(rotations)
    axial = _vee(rotations)
    small = axial / torch.sinc(theta.clamp(max=math.pi / 2) / math.pi)[..., None]
    eye = torch.eye(3, dtype=rotations.dtype, device=rotations.device)
    outer = 0.5 * (rotations + rotations.transpose(-1, -2)) - torch.cos(theta)[..., None, None] * eye
    column = outer.diagonal(dim1=-2, dim2=-1).argmax(-1)
    picked = torch.take_along_dim(outer, column[..., None, None], dim=-1)[..., 0]
    axis = picked / torch.linalg.norm(picked, dim=-1, keepdim=True).clamp_min(1e-300)
    sign = torch.where((axis * axial).sum(-1) < 0, -1.0, 1.0).to(rotations.dtype)
    large = axis * (sign * theta)[..., None]
    return torch.where((theta < math.pi / 2)[..., None], small, large)


def geodesic_distance_deg(rotations_1: Tensor, rotations_2: Tensor) -> Tensor:
    """Angle in degrees of ``R₁ᵀ R₂`` for broadcastable ``(…, 3, 3)`` stacks, in [0, 180]."""
    return torch.rad2deg(_angle_rad(rotations_1.transpose(-1, -2) @ rotations_2))


def cube_offsets(points: int = 1, device=None, dtype=torch.float64) -> Tensor:
    """``((2p+1)³, 3)`` integer offsets {−p … p}³, the last coordinate fastest; the centre
    (0, 0, 0) is row ``(2p+1)³ // 2``."""
    r = torch.arange(-points, points + 1, device=device, dtype=dtype)
    return torch.cartesian_prod(r, r, r)


def local_rotations(centres: Tensor, step_deg: float, points: int = 1) -> Tensor:
    """Cube grids of rotations around ``centres (K, 3, 3)`` in tangent coordinates.

    Rotation ``(k, i)`` is ``centres[k] @ exp_map(step · c_i)``, ``c_i`` row ``i`` of
    :func:`cube_offsets`, so its geodesic distance to the centre is ``|c_i|·step_deg``. The
    perturbation multiplies on the right: it rotates the map in its own frame
    (``(R E)ᵀ k = Eᵀ Rᵀ k``), uniformly around any pose, with no pole singularity;
    ``c = (0, 0, ±1)`` changes RELION's rot by ∓step (ψ and tilt unchanged).

    Returns:
        ``(K, (2·points + 1)³, 3, 3)`` rotation matrices.
    """
    offsets = cube_offsets(points, centres.device, centres.dtype) * math.radians(step_deg)
    return centres[:, None] @ exp_map(offsets)[None]


def _quaternion_to_matrix(q: Tensor) -> Tensor:
    """Unit quaternions ``(…, 4)`` (w, x, y, z) → active rotation matrices ``(…, 3, 3)``."""
    w, x, y, z = q.unbind(-1)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def random_rotations(n: int, generator: torch.Generator | None = None, device=None,
                     dtype=torch.float64) -> Tensor:
    """``(n, 3, 3)`` rotations uniform on SO(3) (Haar), from Shoemake's uniform quaternions.

    ``generator`` must live on ``device`` (CPU by default).
    """
    u1, u2, u3 = torch.rand(3, n, generator=generator, device=device, dtype=dtype)
    a, b = torch.sqrt(1 - u1), torch.sqrt(u1)
    q = torch.stack([a * torch.sin(2 * math.pi * u2), a * torch.cos(2 * math.pi * u2),
                     b * torch.sin(2 * math.pi * u3), b * torch.cos(2 * math.pi * u3)], -1)
    return _quaternion_to_matrix(q)
