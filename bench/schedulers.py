"""diffusers' scheduler for each of minidream's samplers, made as users make it (`from_config`):
the reference of the sampler tests and the other side of the sampling-loop benchmark."""

import numpy as np
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import scheduling_lms_discrete
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler  # diffusers' own is a stub without scipy


def scheduler_from_config(config, sampler: str, karras: bool = False):
    """diffusers' scheduler for a minidream sampler name, from a scheduler config, with diffusers'
    defaults otherwise (DPM-Solver++: order 2, midpoint, first order on the last step; UniPC: bh2)."""
    if sampler == "ddim":
        return DDIMScheduler.from_config(config)
    if sampler == "ddpm":
        return DDPMScheduler.from_config(config)
    if sampler == "euler-a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if sampler == "dpmpp-2m":
        return DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=karras)
    if sampler == "dpmpp-2m-sde":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="sde-dpmsolver++", use_karras_sigmas=karras)
    if sampler == "euler":
        return EulerDiscreteScheduler.from_config(config, use_karras_sigmas=karras)
    if sampler == "heun":
        return HeunDiscreteScheduler.from_config(config, use_karras_sigmas=karras)
    if sampler == "plms":
        return PNDMScheduler.from_config(config, skip_prk_steps=True)
    if sampler == "lms":
        return LMSDiscreteScheduler.from_config(config, use_karras_sigmas=karras)
    if sampler == "unipc":
        return UniPCMultistepScheduler.from_config(config, use_karras_sigmas=karras)
    raise ValueError(sampler)


class GaussLegendre20:
    """Stands in for scipy.integrate (not installed) in diffusers' LMS weights: a 20-point
    Gauss-Legendre rule, exact for their cubic integrands, independent of minidream's 2-point one."""

    @staticmethod
    def quad(function, low, high, epsrel=None):
        nodes, weights = np.polynomial.legendre.leggauss(20)
        half, middle = (high - low) / 2, (high + low) / 2
        return half * sum(w * float(function(middle + half * x)) for x, w in zip(nodes, weights)), 0.0


def lms_integrator_missing() -> bool:
    """diffusers' LMSDiscreteScheduler integrates with scipy, which is not installed here."""
    return not hasattr(scheduling_lms_discrete, "integrate")
