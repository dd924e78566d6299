"""Pose errors against known poses, up to the frame and hand that projections cannot fix.

A map rotated by Q (``v'(r) = v(Q r)``) is seen at poses ``A Q`` where ``v`` is seen at ``A``;
its mirror image ``v(F r)``, ``F = diag(1, 1, −1)``, gives the same projections at ``F A F``
(up to that frame). A reconstruction from unknown poses is determined only up to both, so
its poses are compared with the truth after the best Q (the chordal mean of ``Aᵀ_true A_found``)
for each hand, and the better hand is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cryosgd.pose.so3 import geodesic_distance_deg

_MIRROR = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))


@dataclass(frozen=True)
class PoseErrors:
    """``errors_deg (N,)`` after the global rotation ``rotation (3, 3)``; ``mirrored``: the found
    map is the mirror image of the truth."""

    errors_deg: Tensor
    rotation: Tensor
    mirrored: bool

    @property
    def median_deg(self) -> float:
        return float(self.errors_deg.median())


def chordal_mean(rotations: Tensor) -> Tensor:
    """The rotation nearest (in the Frobenius norm) to the mean of ``(N, 3, 3)`` rotations."""
    u, _, vh = torch.linalg.svd(rotations.mean(0))
    fix = torch.diag(torch.tensor([1.0, 1.0, torch.det(u @ vh).sign()], dtype=rotations.dtype))
    return u @ fix @ vh


def pose_errors(true: Tensor, found: Tensor, hand: bool = True) -> PoseErrors:
    """Rotation errors of ``found (N, 3, 3)`` against ``true (N, 3, 3)`` (RELION matrices) after
    the best global rotation, for the better hand when ``hand`` (module docstring)."""
    true, found = true.double(), found.double()
    results = []
    for mirrored in ((False, True) if hand else (False,)):
        reference = _MIRROR @ true @ _MIRROR if mirrored else true
        rotation = chordal_mean(reference.transpose(-1, -2) @ found)
        rotation = chordal_mean(reference.transpose(-1, -2) @ found @ rotation.T) @ rotation  # one refinement
        results.append(PoseErrors(geodesic_distance_deg(reference @ rotation, found), rotation, mirrored))
    return min(results, key=lambda r: r.median_deg)
