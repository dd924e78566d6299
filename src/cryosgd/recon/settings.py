"""What ``cryosgd reconstruct`` is asked to do, validated where it enters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cryosgd.errors import InputError
from cryosgd.fourier.grids import FourierGrid

METHODS = ("algorithm1", "sgd", "exact-diag", "running-diag", "cg", "pcg")
FULL_BATCH = ("cg", "pcg")
CHOICES = {
    "method": METHODS, "interp": ("trilinear", "nearest"), "prior": ("wiener", "none"), "d0": ("exact", "one"),
    "start": ("backprojection", "zero"), "noise": ("white", "estimate"), "store": ("auto", "memory", "disk"),
    "store_dtype": ("complex64", "bfloat16"),
}


@dataclass(frozen=True)
class ReconstructionSettings:
    """Settings of a known-pose reconstruction (a checkpoint records them; see docs/reconstruction.md).

    ``epochs=None`` (the default) runs epochs while the half-map FSC rises, at most
    ``max_epochs``, and keeps the maps of the best epoch; a number runs exactly that many.
    """

    method: str = "algorithm1"
    epochs: int | None = None
    max_epochs: int = 10
    batch_size: int = 1000  # the paper's; smaller batches add SGD noise to the start map
    interp: str = "trilinear"
    work_box_px: int | None = None
    l2: float = 1e-8
    prior: str = "wiener"  # "wiener": per-shell ridge from the half-map FSC after each epoch; "none"
    shell_ridge: float = 1e-3  # plus this fraction of each shell's mean density H·1 (RELION's floor)
    beta: float = 0.9  # Algorithm 1's exponential-average weight
    forget: float | None = None  # Algorithm 1's probe mean forgets old probes at this rate (moving poses)
    alpha: float | None = None  # Algorithm 1's threshold; None: the paper's 1/(most voxels in a √3 shell)
    d0: str = "exact"  # Algorithm 1's initial diagonal: "one" (the paper) or "exact" (from the first pass)
    use_ctf: bool = True  # False: ignore the CTF columns
    start: str = "backprojection"  # the SGD methods' first map: "backprojection" (one-pass map) or "zero"
    noise: str = "white"  # "white": σ = 1 (the paper, relion_reconstruct); "estimate": σ²(shell) from residuals
    store: str = "auto"  # images FFT'd once and kept in "memory", re-read from "disk", or "auto"
    store_dtype: str = "complex64"  # or "bfloat16" (half the memory)
    seed: int = 0

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise InputError(None, f"--{_option(name)} {value}: expected one of {', '.join(allowed)}")
        _at_least("epochs", self.epochs, 0)
        _at_least("max-epochs", self.max_epochs, 1)
        _at_least("batch-size", self.batch_size, 1)
        for name in ("l2", "shell_ridge"):
            if not getattr(self, name) >= 0:
                raise InputError(None, f"--{_option(name)} {getattr(self, name)}: must be ≥ 0")
        if not 0 <= self.beta < 1:
            raise InputError(None, f"--beta {self.beta}: must be in [0, 1)")
        if self.forget is not None and not 0 <= self.forget < 1:
            raise InputError(None, f"forget {self.forget}: must be in [0, 1)")
        if self.alpha is not None and not self.alpha > 0:
            raise InputError(None, f"--alpha {self.alpha}: must be positive")
        if self.epochs == 0 and (self.full_batch or self.start == "zero"):
            raise InputError(None, "--epochs 0 writes the one-pass map: it needs an SGD method and "
                                   "--start backprojection")

    @property
    def full_batch(self) -> bool:
        """CG and PCG: one full-data H·p per epoch, not minibatch steps."""
        return self.method in FULL_BATCH

    @property
    def uses_exact_diagonal(self) -> bool:
        return self.method in ("exact-diag", "pcg") or (self.method == "algorithm1" and self.d0 == "exact")

    def identity(self) -> dict:
        """What a resumed run must share with the checkpoint: everything but the epoch count."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("epochs", "max_epochs")}


def _option(name: str) -> str:
    return name.replace("_", "-")


def _at_least(option: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise InputError(None, f"--{option} {value}: must be at least {low}")


UPDATES = ("em", "sgd")


@dataclass(frozen=True)
class RefineSettings:
    """Settings of ``cryosgd refine`` (docs/refinement.md); a checkpoint records them.

    Resolutions and lengths are in Å; ``None`` picks the documented default.
    """

    ini_res_A: float = 30.0  # the reference is low-passed to this, and the first search band set by it
    particle_diameter_A: float | None = None  # soft spherical mask; default 0.8 × the box
    sym: str = "C1"
    work_box_px: int | None = None
    max_iter: int = 20
    update: str = "em"  # "em": one pass per iteration (one-pass maps); "sgd": Algorithm 1 on each minibatch
    join_res_A: float = 40.0  # the half maps are averaged below this resolution
    batch_size: int = 1000
    global_order: int = 2  # HEALPix order of the global search (15° at 2)
    top_k: int = 8  # poses kept per particle after the global search
    local_k: int = 2  # poses refined per particle in later iterations
    soft_poses: int = 19  # poses per particle in the local iterations' maps: all of the grid at each's accuracy
    max_shift_A: float | None = None  # origins searched within this radius; default 5 original pixels
    band_margin_px: float = 5.0  # the search band reaches this many shells beyond the FSC-0.143 shell
    local: bool = False  # start from the STAR file's poses (local searches only)
    interp: str = "trilinear"
    store: str = "auto"
    store_dtype: str = "complex64"
    seed: int = 0

    def __post_init__(self):
        for name, allowed in (("update", UPDATES), ("interp", CHOICES["interp"]), ("store", CHOICES["store"]),
                              ("store_dtype", CHOICES["store_dtype"])):
            if getattr(self, name) not in allowed:
                raise InputError(None, f"--{_option(name)} {getattr(self, name)}: expected one of {', '.join(allowed)}")
        for name in ("ini_res_A", "join_res_A", "particle_diameter_A", "max_shift_A"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InputError(None, f"--{_option(name.removesuffix('_A'))} {value}: must be positive (Å)")
        _at_least("max-iter", self.max_iter, 1)
        _at_least("batch-size", self.batch_size, 1)
        _at_least("top-k", self.top_k, 1)
        _at_least("local-k", self.local_k, 1)
        if not 1 <= self.soft_poses <= 19:
            raise InputError(None, f"--soft-poses {self.soft_poses}: expected 1 to 19 (the grid's rotations)")
        if not 0 <= self.global_order <= 4:
            raise InputError(None, f"--global-order {self.global_order}: expected 0 to 4")

    def identity(self) -> dict:
        """What a resumed run must share with the checkpoint: everything but the iteration count."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "max_iter"}


@dataclass(frozen=True)
class AbInitioSettings:
    """Settings of ``cryosgd abinitio`` (docs/abinitio.md); a checkpoint records them."""

    particle_diameter_A: float | None = None  # soft spherical mask; default 0.8 × the box
    start_res_A: float = 35.0  # the band marches from this resolution …
    end_res_A: float = 12.0  # … to this one
    epochs: float = 3.0  # passes over the particles, in minibatches of …
    batch_size: int = 200  # … this many images on average (growing 3× from the first to the last), ≥ 30 steps
    learning_rate: float = 0.5  # of each step g / H·1
    top_k: int = 16  # poses kept per particle for the soft assignment
    max_shift_A: float | None = None  # default 2 working pixels
    seed: int = 0
    flip_hand: bool = False
    store: str = "auto"
    store_dtype: str = "complex64"

    def __post_init__(self):
        for name in ("particle_diameter_A", "start_res_A", "end_res_A", "max_shift_A", "epochs"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InputError(None, f"--{_option(name.removesuffix('_A'))} {value}: must be positive")
        if self.end_res_A > self.start_res_A:
            raise InputError(None, f"--end-res {self.end_res_A}: must not be coarser than --start-res {self.start_res_A}")
        _at_least("batch-size", self.batch_size, 1)
        if not 0 < self.learning_rate <= 1:
            raise InputError(None, f"--learning-rate {self.learning_rate}: must be in (0, 1]")
        _at_least("top-k", self.top_k, 1)
        for name, allowed in (("store", CHOICES["store"]), ("store_dtype", CHOICES["store_dtype"])):
            if getattr(self, name) not in allowed:
                raise InputError(None, f"--{_option(name)} {getattr(self, name)}: expected one of {', '.join(allowed)}")

    def identity(self) -> dict:
        return dataclasses.asdict(self)


def mask_radius_px(diameter_A: float | None, grid: FourierGrid) -> float:
    """The radius, in working pixels, of the soft sphere of ``--particle-diameter`` (default
    0.8 × the box), kept 2 pixels inside the box for its edge. A diameter wider than the box
    is refused: such a mask would mask nothing."""
    box_A = grid.box_px * grid.pixel_A
    if diameter_A is not None and diameter_A > box_A:
        raise InputError(None, f"--particle-diameter {diameter_A:g}: wider than the particles' box "
                               f"({grid.box_px} px × {grid.pixel_A:g} Å = {box_A:g} Å)")
    diameter_A = diameter_A or 0.8 * box_A
    return min(diameter_A / (2 * grid.work_pixel_A), grid.work_box_px / 2 - 2)
