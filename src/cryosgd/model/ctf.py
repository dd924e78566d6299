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

from cryosgd.data.batch import CTFParams


def electron_wavelength_A(voltage_kV: Tensor) -> Tensor:
    """Relativistic electron wavelength (Å) at an acceleration voltage in kV."""
    volts = voltage_kV * 1e3
    return 12.2643247 / torch.sqrt(volts * (1 + 0.978466e-6 * volts))


def ctf_values(params: CTFParams, freq_invA: Tensor) -> Tensor:
    """``(B, P)`` real CTF values of ``params`` at ``(P, 2)`` frequencies ``(kx, ky)`` in Å⁻¹.

    χ is linear in four functions of the frequency, ``s², s² cos 2φ, s² sin 2φ, s⁴`` (with
    cos 2(φ − φ_ast) = cos 2φ cos 2φ_ast + sin 2φ sin 2φ_ast, and cos 2φ, sin 2φ from (kx, ky),
    1 and 0 at k = 0), with per-particle coefficients: χ for all particles is one ``(B, 4) ×
    (4, P)`` matrix product, and the CTF one sine and one product over ``(B, P)`` (the envelope
    one exponential more, where a B-factor is not 0). Compute in float64: χ reaches hundreds
    of radians.
    """
    kx, ky = freq_invA[:, 0], freq_invA[:, 1]
    s2 = kx**2 + ky**2
    safe = torch.where(s2 > 0, s2, torch.ones_like(s2))
    cos_2phi = torch.where(s2 > 0, (kx**2 - ky**2) / safe, torch.ones_like(s2))
    sin_2phi = torch.where(s2 > 0, 2 * kx * ky / safe, torch.zeros_like(s2))
    basis = torch.stack([s2, s2 * cos_2phi, s2 * sin_2phi, s2**2])  # (4, P)
    lam = electron_wavelength_A(params.voltage_kV)
    mean = (params.defocus_u_A + params.defocus_v_A) / 2
    half_diff = (params.defocus_u_A - params.defocus_v_A) / 2
    angle = 2 * torch.deg2rad(params.defocus_angle_deg)
    coefficients = torch.stack([-math.pi * lam * mean, -math.pi * lam * half_diff * torch.cos(angle),
                                -math.pi * lam * half_diff * torch.sin(angle),
                                (math.pi / 2) * params.cs_mm * 1e7 * lam**3], 1).to(basis.dtype)  # (B, 4)
    q0 = params.amplitude_contrast
    offset = -torch.deg2rad(params.phase_shift_deg) - torch.atan(q0 / torch.sqrt(1 - q0**2))
    ctf = torch.addmm(offset.to(basis.dtype)[:, None], coefficients, basis).sin_()
    ctf.mul_(-params.scale.to(basis.dtype)[:, None])
    if bool((params.bfactor_A2 != 0).any()):
        ctf.mul_(torch.exp(-params.bfactor_A2.to(basis.dtype)[:, None] * s2 / 4))
    return ctf
