"""Images/s of central-slice extraction, insertion and both: cryosgd vs torch-fourier-slice.

    python benchmarks/slice_throughput.py [--boxes 64 128 256] [--batches 64 256 1024] [--device cpu]

Both libraries get the same float32 map, rotations and frequency cutoff (radius box/2 − 1);
torch-fourier-slice computes the whole rfft plane, cryosgd the half-disc. Each cell is the
median of ``--repeats`` timed calls after one warm-up call (which includes torch.compile).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cryosgd.conventions import euler_to_matrix
from cryosgd.fourier.grids import FourierGrid
from cryosgd.fourier.slice import extract, insert


def _median_seconds(fn, repeats: int, device: str) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ours(box: int, rotations, device: str):
    grid = FourierGrid.create(box, 1.0)
    freq = grid.freq_px.to(device=device, dtype=torch.float32)
    volume = torch.randn(*grid.volume_shape, dtype=torch.complex64, device=device)
    values = torch.randn(len(rotations), len(freq), dtype=torch.complex64, device=device)
    fwd = lambda: extract(volume, rotations, freq)  # noqa: E731
    adj = lambda: insert(values, rotations, freq, grid.volume_shape)  # noqa: E731
    return fwd, adj, lambda: (fwd(), adj())


def _teamtomo(box: int, rotations, device: str):
    from torch_fourier_slice import extract_central_slices_rfft_3d, insert_central_slices_rfft_3d

    cutoff = (box / 2 - 1) / box
    volume = torch.randn(box, box, box // 2 + 1, dtype=torch.complex64, device=device)
    images = torch.randn(len(rotations), box, box // 2 + 1, dtype=torch.complex64, device=device)
    fwd = lambda: extract_central_slices_rfft_3d(volume, rotations, fftfreq_max=cutoff)  # noqa: E731
    adj = lambda: insert_central_slices_rfft_3d(images, (box,) * 3, rotations, fftfreq_max=cutoff)  # noqa: E731
    return fwd, adj, lambda: (fwd(), adj())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-reference", action="store_true", help="skip torch-fourier-slice")
    args = parser.parse_args()
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    print(f"{'box':>4} {'batch':>6} {'op':>8} {'cryosgd img/s':>14} {'tfs img/s':>10} {'ratio':>7}")
    for box in args.boxes:
        for batch in args.batches:
            angles = torch.rand(batch, 3, dtype=torch.float64) * torch.tensor([360.0, 180.0, 360.0])
            rotations = euler_to_matrix(angles).float().to(args.device)
            ours = _ours(box, rotations, args.device)
            theirs = None if args.no_reference else _teamtomo(box, rotations, args.device)
            for k, op in enumerate(("forward", "adjoint", "fwd+adj")):
                rate = batch / _median_seconds(ours[k], args.repeats, args.device)
                ref = batch / _median_seconds(theirs[k], args.repeats, args.device) if theirs else float("nan")
                print(f"{box:>4} {batch:>6} {op:>8} {rate:>14.0f} {ref:>10.0f} {rate / ref:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
