"""Post-processing: cryosgd against relion_postprocess on one pair of half maps.

    python benchmarks/postprocess_vs_relion.py [HALF1 HALF2 [--mask MASK]] [--seeds 3] [--workdir DIR]

Without half maps it uses the test's pair (tests/test_postprocess.py: 1UBQ in a 64 px box of
1 Å, B 80 Å², noise rising with frequency). Without ``--mask`` the mask is cryosgd's automatic
one, written to the work folder, and both programs use it. Printed per run: the resolution
(corrected masked FSC 0.143), the B-factor and the wall time. RELION runs twice: with its
defaults (``--auto_bfac --autob_lowres 10``, the Guinier fit reaching to where its FSC weights
vanish) and with ``--autob_highres`` at cryosgd's resolution and ``--low_pass -1`` (cryosgd's
defaults); cryosgd runs with each of ``--seeds`` phase-randomisation seeds, with its default fit
range and with RELION's (``autob_highres_A=0``). The last line is the correlation of the two
sharpened maps made with the same settings.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cryosgd.analysis.postprocess import auto_mask, postprocess
from cryosgd.io.mrc import read_map, write_map
from cryosgd.io.star import read_star


def test_pair(folder: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from test_postprocess import VOXEL_A, simulated_half_maps

    _, half1, half2 = simulated_half_maps()
    write_map(folder / "half1.mrc", half1, VOXEL_A)
    write_map(folder / "half2.mrc", half2, VOXEL_A)
    return folder / "half1.mrc", folder / "half2.mrc"


def relion(half1: Path, half2: Path, mask: Path, voxel_A: float, out: Path, *extra: str) -> tuple[float, float, float]:
    """(resolution Å, B-factor Å², seconds) of relion_postprocess."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    subprocess.run(["relion_postprocess", "--i", str(half1), "--i2", str(half2), "--mask", str(mask), "--o",
                    str(out / "postprocess"), "--angpix", str(voxel_A), "--auto_bfac", "--autob_lowres", "10", *extra],
                   check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    general = read_star(out / "postprocess.star")["general"].columns
    return float(general["rlnFinalResolution"][0]), float(general["rlnBfactorUsedForSharpening"][0]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("halves", nargs="*", type=Path)
    parser.add_argument("--mask", type=Path)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="postprocess_vs_relion_"))
    work.mkdir(parents=True, exist_ok=True)
    half1, half2 = args.halves if len(args.halves) == 2 else test_pair(work)
    a, voxel_A = read_map(half1)
    b = read_map(half2)[0]
    mask = args.mask
    if mask is None:
        mask = work / "mask.mrc"
        write_map(mask, auto_mask((a + b) / 2, voxel_A, noise_map=(a - b) / 2).numpy(), voxel_A)
    print(f"{'program':<50} {'resolution Å':>12} {'B Å²':>8} {'s':>6}")
    ours = None
    for seed in range(args.seeds):
        for label, highres in (("fit to the resolution", None), ("fit to Nyquist (RELION's default)", 0.0)):
            start = time.perf_counter()
            result = postprocess(half1, half2, work / f"cryosgd_{seed}_{highres}", mask, seed=seed,
                                 autob_highres_A=highres)
            seconds = time.perf_counter() - start
            ours = ours or result
            print(f"{f'cryosgd seed {seed}, {label}':<50} {result.resolution_A:>12.3f} {result.bfactor_A2:>8.1f} "
                  f"{seconds:>6.2f}")
    for label, extra in (("relion_postprocess (defaults)", ()),
                         ("relion_postprocess, cryosgd's fit and filter",
                          ("--autob_highres", f"{ours.resolution_A:.6f}", "--low_pass", "-1"))):
        resolution_A, bfactor_A2, seconds = relion(half1, half2, mask, voxel_A, work / label.split()[-1], *extra)
        print(f"{label:<50} {resolution_A:>12.3f} {bfactor_A2:>8.1f} {seconds:>6.2f}")
    theirs = read_map(work / "filter" / "postprocess.mrc")[0]
    sharpened = read_map(ours.paths["map_sharpened"])[0]
    correlation = np.corrcoef(sharpened.ravel(), theirs.ravel())[0, 1]
    print(f"correlation of the sharpened maps (same settings): {correlation:.4f}")


if __name__ == "__main__":
    main()
