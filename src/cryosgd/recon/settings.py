"""What ``cryosgd reconstruct`` is asked to do, validated where it enters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cryosgd.errors import InputError

METHODS = ("algorithm1", "sgd", "exact-diag", "cg", "pcg")
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
