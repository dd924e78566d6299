"""The noise model: σ²(shell) per optics group from residuals, and what weighting by it buys."""

import dataclasses

import mrcfile
import numpy as np
import pytest

from cryosgd.fourier.fsc import fsc
from cryosgd.data.particles import read_particles, write_particles
from cryosgd.io.mrc import read_map, write_map
from cryosgd.sim.phantom import blob_phantom
from cryosgd.sim.simulate import SimulationSettings, simulate

from conftest import run_cli

BOX = 32
QUIET = 2.0  # group 1's white noise level over the images' standard deviation
NOISIER = 4.0  # group 2's noise amplitude over group 1's


def _amplitude(radius_px):
    """Noise amplitude profile: 4× at the centre, 1× from |k| ≈ 8 on (coloured, as real data)."""
    return 1 + 3 * np.exp(-(radius_px / 4) ** 2)


@pytest.fixture(scope="module")
def coloured(tmp_path_factory):
    """Blob projections in two optics groups, the second with 4× the noise amplitude; returns
    the STAR and each group's expected σ² per image shell (analytic, from the noise we add)."""
    root = tmp_path_factory.mktemp("coloured")
    write_map(root / "truth.mrc", blob_phantom(BOX, seed=6, sigma_px=1.5), 3.0)
    star = simulate(root / "truth.mrc", root / "sim", SimulationSettings(n_particles=600, snr=1e6, seed=4))
    table = read_particles(star)
    table.optics = [table.optics[0], dataclasses.replace(table.optics[0], name="noisy")]
    table.optics_group = np.arange(len(table)) % 2
    write_particles(star, table)
    ky = np.fft.fftfreq(BOX, 1 / BOX)[:, None]
    kx = np.fft.rfftfreq(BOX, 1 / BOX)[None, :]
    with mrcfile.mmap(star.parent / "particles.mrcs", "r+") as mrc:
        sigma_px = QUIET * float(mrc.data.std()) * np.where(table.optics_group == 1, NOISIER, 1.0)[:, None, None]
        white = np.random.default_rng(0).normal(0, 1, mrc.data.shape) * sigma_px
        mrc.data[:] += np.fft.irfft2(np.fft.rfft2(white) * _amplitude(np.hypot(kx, ky)), s=(BOX, BOX))
    # E|rfft2(noise)(k)|² = σ² n² A(|k|)², averaged over the half-disc pixels of each shell
    r = BOX // 2 - 1
    qy, qx = np.meshgrid(np.arange(-r, r + 1), np.arange(0, r + 1), indexing="ij")
    radius = np.hypot(qx, qy)[np.hypot(qx, qy) <= r]
    shell_mean = np.array([np.mean(_amplitude(radius[np.rint(radius) == s]) ** 2) for s in range(r + 1)])
    sigma1 = float(sigma_px.min())
    expected = np.stack([sigma1**2 * BOX**2 * shell_mean * f**2 for f in (1.0, NOISIER)], axis=1)
    return star, expected


def _run(star, out, noise):
    code, output = run_cli("reconstruct", star, "-o", out, "--noise", noise, "--epochs", 3, "--batch-size", 150)
    assert code == 0, output
    return out


def test_estimated_noise_spectra_match_the_added_noise(coloured, tmp_path):
    star, expected = coloured
    out = _run(star, tmp_path / "e", "estimate")
    lines = (out / "noise.csv").read_text().splitlines()
    assert lines[0] == "shell,resolution_A,sigma2_opticsGroup1,sigma2_noisy"
    sigma2 = np.array([[float(v) for v in line.split(",")[2:]] for line in lines[1:]])
    assert sigma2.shape == expected.shape
    # where the signal the one-pass map misses is small beside the noise: all but the lowest
    # shells, and there too in the noisier group
    np.testing.assert_allclose(sigma2[7:], expected[7:], rtol=0.1)
    np.testing.assert_allclose(sigma2[1:, 1], expected[1:, 1], rtol=0.1)
    np.testing.assert_allclose(sigma2[1:7, 0], expected[1:7, 0], rtol=0.2)


def test_weighting_by_the_noise_model_improves_the_map(coloured, tmp_path):
    star, _ = coloured
    truth, pixel = read_map(star.parent / "ground_truth.mrc")
    quality = {noise: fsc(read_map(_run(star, tmp_path / noise, noise) / "map.mrc")[0], truth, pixel).fsc[4:16].mean()
               for noise in ("white", "estimate")}
    assert quality["estimate"] > quality["white"] + 0.05, quality
