import math

import numpy as np
import torch

from cryosgd.data.batch import CTFParams
from cryosgd.model.ctf import ctf_values, electron_wavelength_A


def _params(**overrides):
    values = dict(defocus_u_A=15000.0, defocus_v_A=12000.0, defocus_angle_deg=35.0, voltage_kV=300.0,
                  cs_mm=2.7, amplitude_contrast=0.07, phase_shift_deg=20.0, bfactor_A2=40.0, scale=0.9)
    values.update(overrides)
    return CTFParams(**{k: torch.tensor([v], dtype=torch.float64) for k, v in values.items()})


def _freqs():
    rng = np.random.default_rng(0)
    return torch.tensor(rng.uniform(-0.3, 0.3, (200, 2)))


def test_wavelength_at_300kV():
    assert abs(float(electron_wavelength_A(torch.tensor(300.0))) - 0.019687) < 1e-5


def _independent(k, defocus_u_A=15000.0, defocus_v_A=12000.0, defocus_angle_deg=35.0, voltage_kV=300.0,
                 cs_mm=2.7, amplitude_contrast=0.07, phase_shift_deg=20.0, bfactor_A2=40.0, scale=0.9):
    """Independent form (pyem / the paper): ac·cos γ − √(1−ac²)·sin γ with γ without the ac term."""
    s2 = (k**2).sum(1).numpy()
    az = np.arctan2(k[:, 1].numpy(), k[:, 0].numpy())
    volts = voltage_kV * 1e3
    lam = 12.2643247 / math.sqrt(volts * (1 + 0.978466e-6 * volts))
    dz = -((defocus_u_A + defocus_v_A) / 2
           + (defocus_u_A - defocus_v_A) / 2 * np.cos(2 * (az - np.radians(defocus_angle_deg))))
    gamma = math.pi * lam * dz * s2 + math.pi / 2 * cs_mm * 1e7 * lam**3 * s2**2 - np.radians(phase_shift_deg)
    ac = amplitude_contrast
    return (ac * np.cos(gamma) - math.sqrt(1 - ac**2) * np.sin(gamma)) * scale * np.exp(-bfactor_A2 * s2 / 4)


def test_ctf_matches_amplitude_contrast_cosine_sine_form():
    p, k = _params(), _freqs()
    np.testing.assert_allclose(ctf_values(p, k)[0].numpy(), _independent(k), atol=1e-12)


def test_particles_of_different_parameters_each_get_their_own_ctf():
    """A batch mixing every parameter, B-factors of zero (no envelope) among them."""
    rows = [dict(defocus_u_A=21000.0, defocus_v_A=20500.0, defocus_angle_deg=-60.0, voltage_kV=200.0, cs_mm=0.01,
                 amplitude_contrast=0.1, phase_shift_deg=0.0, bfactor_A2=0.0, scale=1.0),
            dict(),
            dict(defocus_u_A=8000.0, defocus_v_A=9000.0, voltage_kV=100.0, phase_shift_deg=90.0, bfactor_A2=0.0)]
    rows = [{**dict(defocus_u_A=15000.0, defocus_v_A=12000.0, defocus_angle_deg=35.0, voltage_kV=300.0, cs_mm=2.7,
                    amplitude_contrast=0.07, phase_shift_deg=20.0, bfactor_A2=40.0, scale=0.9), **r} for r in rows]
    batch = CTFParams(**{name: torch.tensor([r[name] for r in rows], dtype=torch.float64) for name in rows[0]})
    k = _freqs()
    got = ctf_values(batch, k).numpy()
    for i, row in enumerate(rows):
        np.testing.assert_allclose(got[i], _independent(k, **row), atol=1e-12)
    zero_b = CTFParams(*(c[[0, 2]] for c in batch.columns()))
    np.testing.assert_allclose(ctf_values(zero_b, k).numpy(), got[[0, 2]], atol=1e-12)


def test_ctf_at_zero_frequency_is_amplitude_contrast():
    p = _params(phase_shift_deg=0.0, scale=1.0)
    assert abs(float(ctf_values(p, torch.zeros(1, 2, dtype=torch.float64))[0, 0]) - 0.07) < 1e-12


def test_defocus_u_acts_along_the_astigmatism_angle():
    angle = math.radians(35.0)
    along = torch.tensor([[math.cos(angle), math.sin(angle)]], dtype=torch.float64) * 0.1
    across = torch.tensor([[-math.sin(angle), math.cos(angle)]], dtype=torch.float64) * 0.1
    stig = _params()
    torch.testing.assert_close(ctf_values(stig, along), ctf_values(_params(defocus_v_A=15000.0), along))
    torch.testing.assert_close(ctf_values(stig, across), ctf_values(_params(defocus_u_A=12000.0), across))
