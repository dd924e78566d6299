"""Images/s of central-slice extraction and insertion: cryosgd's kernels vs torch-fourier-slice.

    python benchmarks/slice_throughput.py [--boxes 64 128 256] [--batches 64 256 1024] [--device cpu]
                                          [--threads N] [--no-reference]

All get the same float32 map, rotations and frequency cutoff (radius box/2 − 1);
torch-fourier-slice (the optional ``bench`` extra) computes the whole rfft plane, cryosgd the
half-disc. ``eager`` runs cryosgd's vectorised PyTorch kernels (``CRYOSGD_NATIVE=0
CRYOSGD_COMPILE=0``), ``compiled`` their ``torch.compile`` forms (``CRYOSGD_COMPILE=1``; the
scatter is compiled only on CUDA), ``native`` the C kernels of ``cryosgd.fourier.native`` (CPU,
where a C compiler is present; nan elsewhere). Each cell is the median of
``--repeats`` timed calls after one warm-up call; ``compile s`` is the compiled warm-up call
of the first batch size (compilation, with whatever inductor cache the machine has).
Operations: ``forward`` extract, ``adjoint`` insert of one complex map, ``fwd+adj`` both,
``adj+H`` one complex map and two real ones (weight powers 1 and 2) in one call, as in a
gradient and Hessian-diagonal step.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

import torch

from cryosgd.conventions import euler_to_matrix
from cryosgd.fourier import native
from cryosgd.fourier.grids import FourierGrid
from cryosgd.fourier.slice import extract, insert, insert_many

OPS = ("forward", "adjoint", "fwd+adj", "adj+H")


def _seconds(fn, repeats: int, device: str) -> tuple[float, float]:
    """(first call, median of ``repeats`` later calls) in seconds."""
    times = []
    for _ in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


TIERS = {"eager": ("0", "0"), "compiled": ("1", "0"), "native": ("0", "1")}  # CRYOSGD_COMPILE, _NATIVE


def _tier(tier: str, fn):
    """``fn`` run with the kernels of ``tier`` (cryosgd reads the settings at each kernel call)."""
    def run():
        os.environ["CRYOSGD_COMPILE"], os.environ["CRYOSGD_NATIVE"] = TIERS[tier]
        return fn()
    return run


def _ours(box: int, rotations, device: str) -> dict:
    grid = FourierGrid.create(box, 1.0)
    freq = grid.freq_px.to(device=device, dtype=torch.float32)
    shape = grid.volume_shape
    volume = torch.randn(*shape, dtype=torch.complex64, device=device)
    values = torch.randn(len(rotations), len(freq), dtype=torch.complex64, device=device)
    curvature = torch.rand(len(rotations), len(freq), device=device)
    fwd = lambda: extract(volume, rotations, freq)  # noqa: E731
    adj = lambda: insert(values, rotations, freq, shape)  # noqa: E731
    both = lambda: insert_many(values[None], curvature, rotations, freq, shape, powers=(1, 2))  # noqa: E731
    return dict(zip(OPS, (fwd, adj, lambda: (fwd(), adj()), both)))


def _teamtomo(box: int, rotations, device: str) -> dict:
    from torch_fourier_slice import extract_central_slices_rfft_3d, insert_central_slices_rfft_3d

    cutoff = (box / 2 - 1) / box
    volume = torch.randn(box, box, box // 2 + 1, dtype=torch.complex64, device=device)
    images = torch.randn(len(rotations), box, box // 2 + 1, dtype=torch.complex64, device=device)
    fwd = lambda: extract_central_slices_rfft_3d(volume, rotations, fftfreq_max=cutoff)  # noqa: E731
    adj = lambda: insert_central_slices_rfft_3d(images, (box,) * 3, rotations, fftfreq_max=cutoff)  # noqa: E731
    return {"forward": fwd, "adjoint": adj, "fwd+adj": lambda: (fwd(), adj())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-reference", action="store_true", help="skip torch-fourier-slice")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reference = not args.no_reference and importlib.util.find_spec("torch_fourier_slice") is not None
    if not args.no_reference and not reference:
        print("torch-fourier-slice not installed (pip install -e '.[bench]'): its column is nan")
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    native_here = args.device == "cpu" and native.available(torch.zeros(1))
    print(f"{'box':>4} {'batch':>6} {'op':>8} {'eager img/s':>12} {'compiled img/s':>15} {'compile s':>10} "
          f"{'native img/s':>13} {'tfs img/s':>10}")
    for box in args.boxes:
        for b, batch in enumerate(args.batches):
            angles = torch.rand(batch, 3, dtype=torch.float64) * torch.tensor([360.0, 180.0, 360.0])
            rotations = euler_to_matrix(angles).float().to(args.device)
            ours = _ours(box, rotations, args.device)
            theirs = _teamtomo(box, rotations, args.device) if reference else {}
            for op in OPS:
                _, eager = _seconds(_tier("eager", ours[op]), args.repeats, args.device)
                first, compiled = _seconds(_tier("compiled", ours[op]), args.repeats, args.device)
                fast = _seconds(_tier("native", ours[op]), args.repeats, args.device)[1] if native_here \
                    else float("nan")
                ref = _seconds(theirs[op], args.repeats, args.device)[1] if op in theirs else float("nan")
                compile_s = f"{first:10.1f}" if b == 0 else f"{'':>10}"
                print(f"{box:>4} {batch:>6} {op:>8} {batch / eager:>12.0f} {batch / compiled:>15.0f} {compile_s} "
                      f"{batch / fast:>13.0f} {batch / ref:>10.0f}", flush=True)


if __name__ == "__main__":
    main()
