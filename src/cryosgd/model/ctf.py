"""Contrast transfer function in RELION's convention, batched over particles.

With s = |k| (Å⁻¹), φ = atan2(ky, kx), λ the electron wavelength (Å):

    Δf(φ) = −[(dU + dV)/2 + (dU − dV)/2 · cos 2(φ − φ_ast)]        (dU, dV > 0: underfocus)
    χ(s)  = π λ Δf s² + (π/2) Cs λ³ s⁴ − phase_shift − atan(Q0 / √(1 − Q0²))
    CTF   = −sin χ · scale · exp(−B s² / 4)

so CTF(0) = +Q0 (positive density stays positive), as in ``relion_project --ctf``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cryosgd.compiled import maybe_compile
from cryosgd.data.batch import CTFParams


def electron_wavelength_A(voltage_kV: Tensor) -> Tensor:
    """Relativistic electron wavelength (Å) at an acceleration voltage in kV."""
    volts = voltage_kV * 1e3
    return 12.2643247 / torch.sqrt(volts * (1 + 0.978466e-6 * volts))


def ctf_values(params: CTFParams, freq_invA: Tensor) -> Tensor:
    """``(B, P)`` real CTF values of ``params`` at ``(P, 2)`` frequencies ``(kx, ky)`` in Å⁻¹."""
    return _ctf_fast(*(c[:, None] for c in params.columns()), freq_invA[:, 0], freq_invA[:, 1])


def ctf_formula(defocus_u_A, defocus_v_A, defocus_angle_deg, voltage_kV, cs_mm, amplitude_contrast,
                phase_shift_deg, bfactor_A2, scale, kx, ky) -> Tensor:
    """The formula of the module docstring; parameters ``(B, 1)``, frequencies ``(P,)``.

    cos 2(φ − φ_ast) is expanded as cos 2φ cos 2φ_ast + sin 2φ sin 2φ_ast, with cos 2φ and sin 2φ
    from (kx, ky) per frequency (φ = atan2(ky, kx), 0 at k = 0): no angle per (particle,
    frequency), a third of the work of the direct form.
    """
    s2 = kx**2 + ky**2
    safe = torch.where(s2 > 0, s2, torch.ones_like(s2))
    cos_2phi = torch.where(s2 > 0, (kx**2 - ky**2) / safe, torch.ones_like(s2))
    sin_2phi = torch.where(s2 > 0, 2 * kx * ky / safe, torch.zeros_like(s2))
    lam = electron_wavelength_A(voltage_kV)
    mean = (defocus_u_A + defocus_v_A) / 2
    half_diff = (defocus_u_A - defocus_v_A) / 2
    angle = 2 * torch.deg2rad(defocus_angle_deg)
    defocus = -(mean + half_diff * (cos_2phi * torch.cos(angle) + sin_2phi * torch.sin(angle)))
    q0 = amplitude_contrast
    chi = (math.pi * lam * defocus * s2 + (math.pi / 2) * cs_mm * 1e7 * lam**3 * s2**2
           - torch.deg2rad(phase_shift_deg) - torch.atan(q0 / torch.sqrt(1 - q0**2)))
    return -torch.sin(chi) * scale * torch.exp(-bfactor_A2 * s2 / 4)


_ctf_fast = maybe_compile(ctf_formula)
