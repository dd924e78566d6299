"""Post-processing of half maps (cryosgd.analysis.postprocess) against the truth and relion_postprocess.

The half maps are ubiquitin (1UBQ rendered in a 64 px box of 1 Å voxels, blurred by B = 80 Å²)
plus independent noise per half whose amplitude grows linearly with frequency, so that the
half-map FSC falls through 0.143 near 3 Å, well inside the box.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.resources
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from cryosgd.analysis.postprocess import (auto_mask, connected_components, distance_to, fit_guinier, masked_fsc,
                                          postprocess)
from cryosgd.errors import InputError
from cryosgd.io.mrc import read_map, write_map
from cryosgd.io.star import read_star
from cryosgd.sim.phantom import blob_phantom
from cryosgd.sim.simulate import blur, model_to_map

BOX, VOXEL_A, BFACTOR_A2 = 64, 1.0, 80.0


def simulated_half_maps(noise: float = 1.0, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth, half1, half2): 1UBQ blurred by B = 80 Å², plus per-half noise of amplitude ∝ |s|
    and of standard deviation ``noise`` × the truth's."""
    truth = blur(model_to_map(importlib.resources.files("cryosgd") / "data" / "1ubq.pdb", BOX, VOXEL_A),
                 VOXEL_A, BFACTOR_A2)
    rng = np.random.default_rng(seed)
    k = np.fft.fftfreq(BOX)
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.fft.rfftfreq(BOX)[None, None, :] ** 2)
    halves = []
    for _ in range(2):
        coloured = np.fft.irfftn(np.fft.rfftn(rng.normal(size=(BOX,) * 3)) * radius, s=(BOX,) * 3, axes=(0, 1, 2))
        halves.append((truth + noise * truth.std() * coloured / coloured.std()).astype(np.float32))
    return truth, halves[0], halves[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The truth, the half maps (also as half1.mrc and half2.mrc) and their automatic mask."""
    folder = tmp_path_factory.mktemp("halves")
    truth, half1, half2 = simulated_half_maps()
    write_map(folder / "half1.mrc", half1, VOXEL_A)
    write_map(folder / "half2.mrc", half2, VOXEL_A)
    mask = auto_mask((half1 + half2) / 2, VOXEL_A, noise_map=(half1 - half2) / 2).numpy()
    return {"folder": folder, "truth": truth, "half1": half1, "half2": half2, "mask": mask}


@pytest.fixture(scope="module")
def result(data, tmp_path_factory):
    """postprocess() with its automatic mask."""
    folder = data["folder"]
    return postprocess(folder / "half1.mrc", folder / "half2.mrc", tmp_path_factory.mktemp("out"))


@pytest.fixture
def relion_postprocess(relion):
    if shutil.which("relion_postprocess") is None:
        if os.environ.get("CRYOSGD_REQUIRE_RELION"):
            pytest.fail("CRYOSGD_REQUIRE_RELION is set but relion_postprocess is not on PATH")
        pytest.skip("relion_postprocess not installed")


def test_auto_mask_covers_the_structure_and_little_else(data):
    mask, truth = data["mask"], data["truth"]
    assert mask.min() >= 0 and mask.max() <= 1
    assert mask[truth > 0.1 * truth.max()].min() >= 0.99
    assert (mask > 0).mean() < 0.35 and (mask >= 0.99).mean() < 0.2


def test_auto_mask_keeps_separate_domains_and_drops_weak_specks():
    axis = np.arange(BOX) - BOX // 2
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")

    def blob(centre, weight, sigma_px=2.0):
        distance2 = (x - centre[2]) ** 2 + (y - centre[1]) ** 2 + (z - centre[0]) ** 2
        return weight * np.exp(-distance2 / (2 * sigma_px**2))

    domains = blob((0, 0, -16), 1.0) + blob((0, 0, 16), 0.4)
    speck = blob((-16, 16, 0), 0.06)
    mask = auto_mask(domains + speck, 2.0).numpy()  # 15 Å low-pass: 7.5 px
    centre = BOX // 2
    assert mask[centre, centre, centre - 16] == 1 and mask[centre, centre, centre + 16] == 1
    assert mask[centre - 16, centre + 16, centre] == 0
    assert mask[centre, centre, centre] == 0


def test_auto_mask_matches_relion_mask_create(data, tmp_path, relion_postprocess):
    """Same threshold, low-pass, extension and soft edge: relion_mask_create's mask."""
    joint = (data["half1"] + data["half2"]) / 2
    write_map(tmp_path / "joint.mrc", joint, VOXEL_A)
    threshold = 0.2 * joint.max()
    subprocess.run(["relion_mask_create", "--i", "joint.mrc", "--o", "relion_mask.mrc", "--lowpass", "15", "--angpix",
                    str(VOXEL_A), "--ini_threshold", str(threshold), "--extend_inimask", "3", "--width_soft_edge", "6"],
                   cwd=tmp_path, capture_output=True, check=True)
    theirs, _ = read_map(tmp_path / "relion_mask.mrc", need_voxel_size=False)
    ours = auto_mask(joint, VOXEL_A, 15.0, threshold, 3, 6).numpy()
    assert np.abs(ours - theirs).mean() < 0.01
    assert ((ours == 1) == (theirs == 1)).mean() > 0.99


def test_connected_components_match_scipy_26_connectivity():
    from scipy.ndimage import label

    rng = np.random.default_rng(0)
    binary = rng.random((23, 31, 17)) < 0.3
    labels = connected_components(torch.as_tensor(binary)).numpy()
    expected, count = label(binary, structure=np.ones((3, 3, 3)))
    assert len(np.unique(labels[binary])) == count
    pairs = np.unique(np.stack([labels[binary], expected[binary]]), axis=1)
    assert pairs.shape[1] == count and (labels[~binary] == 0).all()


def test_distance_matches_scipy_euclidean_distance_transform():
    from scipy.ndimage import distance_transform_edt

    rng = np.random.default_rng(1)
    binary = rng.random((20, 24, 28)) < 0.002
    distance = distance_to(torch.as_tensor(binary), 6.5).numpy()
    expected = distance_transform_edt(~binary)
    near = expected <= 6.5
    np.testing.assert_allclose(distance[near], expected[near], atol=1e-12)
    assert np.isinf(distance[~near]).all()


def test_phase_randomisation_removes_the_correlation_a_tight_mask_adds(data):
    tight = (data["truth"] > 0.2 * data["truth"].max()).astype(float)  # hard-edged, inside the density
    curves = masked_fsc(data["half1"], data["half2"], tight, VOXEL_A)
    shell = {name: round(BOX * VOXEL_A / curve.resolution_at(0.143))
             for name, curve in (("masked", curves.masked), ("corrected", curves.corrected),
                                 ("unmasked", curves.unmasked))}
    assert shell["masked"] >= shell["corrected"] + 4
    assert abs(shell["corrected"] - shell["unmasked"]) <= 3
    start = curves.randomize_at + 2  # RELION corrects from two shells beyond the randomisation
    assert curves.unmasked.fsc[curves.randomize_at] < 0.8 <= curves.unmasked.fsc[1:curves.randomize_at].min()
    np.testing.assert_array_equal(curves.corrected.fsc[:start], curves.masked.fsc[:start])
    masked, random = curves.masked.fsc[start:], curves.random.fsc[start:]
    np.testing.assert_allclose(curves.corrected.fsc[start:], (masked - random) / (1 - random))
    beyond = slice(shell["corrected"] + 2, BOX // 2 + 1)
    assert curves.random.fsc[beyond].min() > 0.3
    assert (curves.masked.fsc[beyond] - curves.corrected.fsc[beyond]).min() > 0.3


def test_sharpening_flattens_the_guinier_plot(result):
    rows = list(csv.DictReader(open(result.paths["guinier_csv"])))
    used = [row for row in rows if row["used_in_fit"] == "1"]
    s2 = np.array([float(row["s2_invA2"]) for row in used])
    before = np.polyfit(s2, [float(row["ln_amplitude_weighted"]) for row in used], 1)[0]
    after = np.polyfit(s2, [float(row["ln_amplitude_sharpened"]) for row in used], 1)[0]
    assert 4 * before == pytest.approx(result.bfactor_A2, rel=1e-6)
    assert result.bfactor_A2 < -40
    assert abs(4 * after) < 0.02 * abs(result.bfactor_A2)


def test_postprocess_writes_its_outputs(result, data):
    folder = result.paths["map_sharpened"].parent
    for name in ("mask.mrc", "map_sharpened.mrc", "map_sharpened_masked.mrc", "fsc.csv", "fsc.png", "guinier.csv",
                 "guinier.png"):
        assert (folder / name).is_file(), name
    sharpened, voxel_A = read_map(folder / "map_sharpened.mrc")
    assert voxel_A == pytest.approx(VOXEL_A) and sharpened.shape == (BOX,) * 3
    mask, _ = read_map(folder / "mask.mrc")
    np.testing.assert_allclose(mask, data["mask"], atol=1e-6)
    rows = list(csv.DictReader(open(folder / "fsc.csv")))
    assert list(rows[0]) == ["shell", "resolution_A", "fsc_unmasked", "fsc_masked", "fsc_random", "fsc_corrected"]
    assert len(rows) == BOX // 2 + 1
    assert 2.5 <= result.resolution_A <= 3.6
    assert "\n" not in result.summary and f"{result.resolution_A:.2f} Å" in result.summary
    assert "B-factor −" in result.summary and str(result.paths["map_sharpened"]) in result.summary
    assert result.fit_shells == int(np.loadtxt(folder / "guinier.csv", delimiter=",", skiprows=1)[:, -1].sum())
    assert result.fit_shells >= 5 and "uncertain" not in result.summary
    assert "fitted on 3 shells only: uncertain" in dataclasses.replace(result, fit_shells=3).summary


def test_a_map_coarser_than_the_guinier_band_is_weighted_and_low_passed_but_not_sharpened(tmp_path):
    """Half maps at about 12 Å: no shell between --autob-lowres (10 Å) and the resolution. The
    run ends, says so, and applies no B-factor (the fit's band is empty, not an error)."""
    s2 = np.linspace(0, 0.1, 20)
    fit = fit_guinier(s2, -10 * s2, lowres_A=2.0, highres_A=6.55)
    assert fit.bfactor_A2 == 0 and not fit.used.any()
    truth = blob_phantom(16)
    rng = np.random.default_rng(0)
    for h in (1, 2):
        write_map(tmp_path / f"half{h}.mrc", truth + truth.std() * rng.normal(size=truth.shape), 3.0)
    result = postprocess(tmp_path / "half1.mrc", tmp_path / "half2.mrc", tmp_path / "out")
    assert result.resolution_A > 10 and result.fit_shells == 0 and result.bfactor_A2 == 0
    assert "no B-factor" in result.summary and "not sharpened" in result.summary
    assert (tmp_path / "out" / "map_sharpened.mrc").is_file()
    rows = (tmp_path / "out" / "guinier.csv").read_text().splitlines()[1:]
    assert rows and all(row.split(",")[4:] == ["", "0"] for row in rows), rows[:3]  # no line, no shell used


def test_resolution_and_bfactor_match_relion_postprocess(data, tmp_path, relion_postprocess):
    """relion_postprocess on the same half maps and mask; --autob_highres set to our resolution
    (ours fits the Guinier plot up to the resolution; RELION's default, 0, fits every shell up
    to where its FSC weights vanish, which depends on the noise in the FSC there)."""
    folder = data["folder"]
    write_map(tmp_path / "mask.mrc", data["mask"], VOXEL_A)
    ours = postprocess(folder / "half1.mrc", folder / "half2.mrc", tmp_path / "ours", tmp_path / "mask.mrc")
    run = subprocess.run(["relion_postprocess", "--i", str(folder / "half1.mrc"), "--i2", str(folder / "half2.mrc"),
                          "--mask", "mask.mrc", "--o", "relion", "--angpix", str(VOXEL_A), "--auto_bfac",
                          "--autob_lowres", "10", "--autob_highres", f"{ours.resolution_A:.6f}", "--low_pass", "-1"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert (tmp_path / "relion.star").is_file(), run.stdout[-2000:] + run.stderr[-2000:]
    star = read_star(tmp_path / "relion.star")
    general, table = star["general"].columns, star["fsc"].columns
    theirs_A, theirs_B = float(general["rlnFinalResolution"][0]), float(general["rlnBfactorUsedForSharpening"][0])
    assert abs(BOX * VOXEL_A / ours.resolution_A - BOX * VOXEL_A / theirs_A) <= 1
    assert round(BOX * VOXEL_A / float(general["rlnRandomiseFrom"][0])) == ours.fsc.randomize_at
    assert ours.bfactor_A2 == pytest.approx(theirs_B, rel=0.15)
    for column, curve in (("rlnFourierShellCorrelationUnmaskedMaps", ours.fsc.unmasked),
                          ("rlnFourierShellCorrelationMaskedMaps", ours.fsc.masked)):
        np.testing.assert_allclose(curve.fsc, np.array(table[column], dtype=float), atol=0.02)
    sharpened, _ = read_map(ours.paths["map_sharpened"])
    relion_map, _ = read_map(tmp_path / "relion.mrc")
    assert np.corrcoef(sharpened.ravel(), relion_map.ravel())[0, 1] > 0.98


@pytest.mark.parametrize("case,culprit,words", [
    ("shape", "half2", "differs from"), ("voxel", "half2", "voxel size"), ("zero", "half2", "all zero"),
    ("missing", "half2", "not found"), ("identical", None, "never drops below 0.8"),
    ("mask_shape", "mask", "mask shape"), ("mask_range", "mask", "[0, 1]"), ("mask_zero", "mask", "all zero"),
    ("mask_voxel", "mask", "differs from the half maps'")])
def test_bad_inputs_give_one_line_errors_that_name_the_file(tmp_path, case, culprit, words):
    rng = np.random.default_rng(0)
    good = rng.normal(size=(16,) * 3).astype(np.float32)
    maps = {"half1": good, "half2": rng.normal(size=(16,) * 3).astype(np.float32), "mask": np.ones_like(good)}
    maps.update({"shape": {"half2": good[:8, :8, :8]}, "zero": {"half2": np.zeros_like(good)}, "identical":
                 {"half2": good}, "mask_shape": {"mask": np.ones((8,) * 3)}, "mask_range": {"mask": 2 * maps["mask"]},
                 "mask_zero": {"mask": np.zeros_like(good)}}.get(case, {}))
    paths = {name: tmp_path / f"{name}_{case}.mrc" for name in maps}
    for name, volume in maps.items():
        if not (case == "missing" and name == "half2"):
            write_map(paths[name], volume, 2 * VOXEL_A if (case, name) in (("voxel", "half2"), ("mask_voxel", "mask"))
                      else VOXEL_A)
    with pytest.raises(InputError) as error:
        postprocess(paths["half1"], paths["half2"], tmp_path / "out", paths["mask"])
    message = str(error.value)
    assert "\n" not in message and words in message
    assert culprit is None or message.startswith(f"{paths[culprit]}: ")
    assert not (tmp_path / "out").exists()
