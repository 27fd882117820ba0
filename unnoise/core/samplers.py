"""Samplers: stateless functions that walk a decreasing sigma grid with a denoiser ``D(x, sigma, **cond)``.

Every sampler has the signature ``sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None,
eta=None, **cond)``. ``x`` is the starting state at ``sigmas[0]`` in sigma scaling (``x0 + sigma * noise``);
the result is the state at ``sigmas[-1]``, in float32 when ``x`` is fp16 or bf16 (the network may run in those;
the sampler state does not). Steps go over neighbouring pairs of ``sigmas``, never recomputed.

``callback(i, sigma, x, denoised)`` is called once per step with the state at ``sigma`` and its denoised
estimate; if it returns ``True`` sampling stops and the current state is returned.

``SAMPLER_INFO`` holds one ``SamplerInfo`` record per sampler (its function, default eta, network evaluations and
names in AUTOMATIC1111 and diffusers); ``SAMPLERS``, ``STOCHASTIC`` and ``nfe`` are derived from it, so adding a
sampler means writing its function and one record.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from unnoise.core.denoisers import VPDenoiser, data_std
from unnoise.core.noise import Generator, check_generators, randn_like
from unnoise.core.schedules import check_choice, check_grid

Denoiser = Callable[..., Tensor]
Callback = Callable[[int, float, Tensor, Tensor], Any]


# -- shared pieces ---------------------------------------------------------------------------------------------


def to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """The probability-flow ODE derivative ``dx/dsigma = (x - D(x, sigma)) / sigma``, Karras et al. 2022 eq. 4."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step to ``sigma_next`` into a deterministic part to ``sigma_down`` and fresh noise ``sigma_up``.

    With eta=1, ``sigma_up**2`` is the DDPM posterior variance in sigma scaling (Ho et al. 2020, eq. 7);
    general eta is DDIM's (Song et al. 2021, eq. 16).
    """
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def _check(x: Tensor, sigmas: Tensor, generator: Generator) -> Tensor:
    """Validate the inputs; return the state in float32 at least, whatever the network's dtype (fp16/bf16)."""
    check_grid(sigmas)
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise ValueError("x must be a batched tensor (batch first)")
    if not torch.isfinite(x).all():
        raise ValueError("x contains non-finite values")
    check_generators(generator, x.shape[0])
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _eta(name: str, eta: float | None) -> float:
    """The eta to run sampler ``name`` with: its record's default, or the caller's if the sampler takes one."""
    info = SAMPLER_INFO[name]  # defined below, after the functions it lists
    if eta is None:
        return info.eta
    if not info.eta_adjustable and eta != info.eta:
        takers = [n for n, i in SAMPLER_INFO.items() if i.eta_adjustable]
        raise ValueError(f"sampler {name!r} does not take eta={eta!r}; eta applies to {', '.join(takers)}")
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta={eta!r} must be a finite number >= 0")
    return eta


def _pairs(sigmas: Tensor) -> list[tuple[float, float]]:
    values = sigmas.tolist()
    return list(zip(values[:-1], values[1:]))


# -- first-order samplers --------------------------------------------------------------------------------------


def _ancestral(denoiser, x, sigmas, generator, callback, eta, cond) -> Tensor:
    """Euler step to sigma_down, then fresh noise of std sigma_up: DDPM (eta 1), DDIM (eta), Euler ancestral."""
    for i, (sigma, sigma_next) in enumerate(_pairs(sigmas)):
        denoised = denoiser(x, sigma, **cond)
        if callback is not None and callback(i, sigma, x, denoised) is True:
            return x
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = denoised + to_d(x, sigma, denoised) * sigma_down
        if sigma_up > 0:
            x = x + randn_like(x, generator) * sigma_up
    return x


def sample_ddpm(denoiser, x, sigmas, *, generator=None, callback=None, eta=None, **cond) -> Tensor:
    """DDPM ancestral sampling with the posterior variance ("fixed_small"), Ho et al. 2020, Alg. 2."""
    x = _check(x, sigmas, generator)
    return _ancestral(denoiser, x, sigmas, generator, callback, _eta("ddpm", eta), cond)


def sample_ddim(denoiser, x, sigmas, *, generator=None, callback=None, eta=None, **cond) -> Tensor:
    """DDIM, Song et al. 2021, eq. 12; eta=0 is Euler on the probability-flow ODE, eta=1 is DDPM."""
    x = _check(x, sigmas, generator)
    return _ancestral(denoiser, x, sigmas, generator, callback, _eta("ddim", eta), cond)


def sample_euler_a(denoiser, x, sigmas, *, generator=None, callback=None, eta=None, **cond) -> Tensor:
    """Euler ancestral, Crowson 2022 (k-diffusion's ``sample_euler_ancestral``); eta 1 by default."""
    x = _check(x, sigmas, generator)
    return _ancestral(denoiser, x, sigmas, generator, callback, _eta("euler_a", eta), cond)


def sample_euler(denoiser, x, sigmas, *, generator=None, callback=None, eta=None, **cond) -> Tensor:
    """Euler's method on the probability-flow ODE, Karras et al. 2022, Alg. 2 without the second-order step."""
    x = _check(x, sigmas, generator)
    _eta("euler", eta)
    for i, (sigma, sigma_next) in enumerate(_pairs(sigmas)):
        denoised = denoiser(x, sigma, **cond)
        if callback is not None and callback(i, sigma, x, denoised) is True:
            return x
        x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
    return x


def sample_heun(denoiser, x, sigmas, *, generator=None, callback=None, eta=None, **cond) -> Tensor:
    """Heun's second-order method, Karras et al. 2022, Alg. 1; the last step to sigma 0 is Euler."""
    x = _check(x, sigmas, generator)
    _eta("heun", eta)
    for i, (sigma, sigma_next) in enumerate(_pairs(sigmas)):
        denoised = denoiser(x, sigma, **cond)
        if callback is not None and callback(i, sigma, x, denoised) is True:
            return x
        d = to_d(x, sigma, denoised)
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
            continue
        d_next = to_d(x_euler, sigma_next, denoiser(x_euler, sigma_next, **cond))
        x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x


# -- multistep samplers in log-sigma time (lambda = -log sigma, h = lambda_next - lambda) ------------------------


def sample_dpmpp_2m(denoiser, x, sigmas, *, generator=None, callback=None, eta=None, **cond) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022, Alg. 2; first and last (to sigma 0) steps are first order."""
    x = _check(x, sigmas, generator)
    return _dpmpp_2m(denoiser, x, sigmas, generator, callback, _eta("dpmpp_2m", eta), cond)


def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, generator=None, callback=None, eta=None, **cond) -> Tensor:
    """DPM-Solver++(2M) SDE with the midpoint rule, Lu et al. 2022, App. B (diffusers' sde-dpmsolver++)."""
    x = _check(x, sigmas, generator)
    return _dpmpp_2m(denoiser, x, sigmas, generator, callback, _eta("dpmpp_2m_sde", eta), cond)


def _dpmpp_2m(denoiser, x, sigmas, generator, callback, eta, cond) -> Tensor:
    """DPM-Solver++(2M) steps with SDE noise of strength eta; eta 0 is the ODE solver, Lu et al. 2022, Alg. 2."""
    old_denoised, h_last = None, None
    for i, (sigma, sigma_next) in enumerate(_pairs(sigmas)):
        denoised = denoiser(x, sigma, **cond)
        if callback is not None and callback(i, sigma, x, denoised) is True:
            return x
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        eta_h = eta * h
        d = denoised if old_denoised is None else _midpoint(denoised, old_denoised, h_last / h)
        # With eta 0 this is the ODE update bit for bit: exp(-0.0) == 1.0 and -h - 0.0 == -h in floating point.
        x = (sigma_next / sigma) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * d
        if eta > 0:
            x = x + randn_like(x, generator) * (sigma_next * math.sqrt(-math.expm1(-2 * eta_h)))
        old_denoised, h_last = denoised, h
    return x


def _midpoint(denoised: Tensor, old_denoised: Tensor, r: float) -> Tensor:
    """Second-order data estimate of DPM-Solver++(2M): ``D0 + (D0 - D_-1) / (2 r)``, r = h_last / h."""
    return denoised + (denoised - old_denoised) / (2 * r)


def sample_unipc(denoiser, x, sigmas, *, generator=None, callback=None, eta=None, **cond) -> Tensor:
    """UniPC-bh2 of order 2 with data prediction, Zhao et al. 2023, Alg. 1-2 (diffusers' UniPCMultistep default)."""
    # Each step first corrects the current state with the new evaluation (UniC), then predicts the next state
    # (UniP); the last step, to sigma 0, is first order. The evaluation at the uncorrected state is reused.
    x = _check(x, sigmas, generator)
    _eta("unipc", eta)
    pairs = _pairs(sigmas)
    prev = None  # (x at the previous sigma, its denoised, previous sigma, the order of the step taken from it)
    older = None  # (denoised, sigma) one step further back
    for i, (sigma, sigma_next) in enumerate(pairs):
        denoised = denoiser(x, sigma, **cond)
        if callback is not None and callback(i, sigma, x, denoised) is True:
            return x
        if prev is not None:  # UniC: correct x using the evaluation made at it
            x_prev, m_prev, sigma_prev, order = prev
            x = _unipc_update(x_prev, sigma_prev, sigma, m_prev, older if order == 2 else None, denoised)
        order = 1 if prev is None or i == len(pairs) - 1 else 2
        if sigma_next == 0:
            x_next = denoised
        else:
            x_next = _unipc_update(x, sigma, sigma_next, denoised, (m_prev, sigma_prev) if order == 2 else None, None)
        older = (prev[1], prev[2]) if prev is not None else None
        prev = (x, denoised, sigma, order)
        x, m_prev, sigma_prev = x_next, denoised, sigma
    return x


def _unipc_update(x, sigma, sigma_next, m0, history, m_next) -> Tensor:
    """One bh2 UniP step (``m_next`` None) or UniC step from ``sigma`` to ``sigma_next``; history = (m_-1, sigma_-1)."""
    h = math.log(sigma / sigma_next)
    b_h = math.expm1(-h)  # bh2: B(h) = e^{-h} - 1 in data-prediction form
    x_base = (sigma_next / sigma) * x - b_h * m0
    d1 = rk = None
    if history is not None:
        m_old, sigma_old = history
        rk = math.log(sigma / sigma_old) / h  # (lambda_old - lambda_0) / h, negative
        d1 = (m_old - m0) / rk
    if m_next is None:  # predictor: order 1, or order 2 with rho = 1/2
        return x_base if d1 is None else x_base - b_h * 0.5 * d1
    # corrector: solve R rho = b for the coefficients (Zhao et al. 2023, eq. 14 with B(h) = e^{-h} - 1)
    hh = -h
    phi_1 = b_h / hh - 1  # h*phi_2 ... written as in the paper's recursion
    b1 = phi_1 / b_h
    phi_2 = phi_1 / hh - 0.5
    b2 = phi_2 * 2 / b_h
    if d1 is None:
        rho_c = [0.5]
    else:
        rho_c = torch.linalg.solve(
            torch.tensor([[1.0, 1.0], [rk, 1.0]], dtype=torch.float64), torch.tensor([b1, b2], dtype=torch.float64)
        ).tolist()
    correction = rho_c[-1] * (m_next - m0)
    if d1 is not None:
        correction = correction + rho_c[0] * d1
    return x_base - b_h * correction


# -- exponential multistep in Gaussian-prior time ------------------------------------------------------------------
#
# With v = sigma_data^2 + sigma^2, tau = log(v) / 2 and G = (v D - sigma_data^2 x) / sigma^2, the probability-flow
# ODE is dx/dtau = x - G, and G is constant for Gaussian data of std sigma_data (the linear part that DPM-Solver-v3,
# Zheng et al. 2023, fits from model statistics, here fixed by a Gaussian prior). Integrating exactly in s = -tau
# with G a polynomial through past evaluations is an exponential Adams-Bashforth step (Hochbruck & Ostermann
# 2010); adding the newest evaluation and redoing the step is the Adams-Moulton corrector that UniPC introduced.
# tau stays finite at sigma 0, so the last step keeps its order instead of jumping to x = D.


def sample_gauss_pc(denoiser, x, sigmas, *, generator=None, callback=None, eta=None, **cond) -> Tensor:
    """Third-order exponential Adams predictor-corrector in Gaussian-prior time, Hochbruck & Ostermann 2010 (above)."""
    x = _check(x, sigmas, generator)
    _eta("gauss_pc", eta)
    sd2 = data_std(denoiser) ** 2
    history: list[tuple[float, Tensor]] = []  # (s, G), newest first; s = -tau grows as sigma falls
    x_prev = None
    for i, (sigma, sigma_next) in enumerate(_pairs(sigmas)):
        denoised = denoiser(x, sigma, **cond)
        if callback is not None and callback(i, sigma, x, denoised) is True:
            return x
        s = -0.5 * math.log(sd2 + sigma**2)
        g = denoised + (sd2 / sigma**2) * (denoised - x)
        if x_prev is not None:  # corrector: redo the last step with the new evaluation as one more point
            x = _exp_multistep(x_prev, [(s, g), *history], history[0][0], s, min(4, len(history) + 1))
        history = [(s, g), *history[:3]]
        x_prev = x
        x = _exp_multistep(x, history, s, -0.5 * math.log(sd2 + sigma_next**2), min(3, len(history)))
    return x


def _exp_multistep(x: Tensor, points: list[tuple[float, Tensor]], s: float, s_next: float, order: int) -> Tensor:
    """``x(s_next) = e^-h x + sum_j phi_j(h) g^(j)(s)``, g's derivatives from the polynomial through ``points``."""
    h = s_next - s
    offsets = [p[0] - s for p in points[:order]]
    vander = torch.tensor([[u**j / math.factorial(j) for j in range(order)] for u in offsets], dtype=torch.float64)
    weights = torch.linalg.inv(vander).tolist()  # row j: the j-th derivative at s as a combination of the points
    phi = -math.expm1(-h)  # phi_0 = int_0^h e^-(h-u) du; phi_j = h^j / j! - phi_{j-1}
    out = math.exp(-h) * x
    for j in range(order):
        if j > 0:
            phi = h**j / math.factorial(j) - phi
        derivative = sum(w * p[1] for w, p in zip(weights[j], points[:order]))
        out = out + phi * derivative
    return out


# -- consistency sampling ----------------------------------------------------------------------------------------
#
# A latent consistency model (Luo et al. 2023) maps any point of an ODE trajectory to its origin through
# f(x, t) = c_skip(t) x_vp + c_out(t) x0_hat(x, t), with x_vp = x / sqrt(1 + sigma^2) the VP-scaled state and the
# scalings of Song et al. 2023 at the timestep scaled by 10, so that f is the identity at t = 0. Multistep sampling
# evaluates f and noises its output afresh to the next sigma.

LCM_TIMESTEP_SCALING = 10.0  # diffusers' LCMScheduler timestep_scaling
LCM_SIGMA_DATA = 0.5
LCM_ORIGINAL_STEPS = 50  # the solver grid LCMs are distilled on (diffusers' original_inference_steps)


def consistency_scalings(t: Tensor | float, timestep_scaling: float = LCM_TIMESTEP_SCALING) -> tuple[Tensor, Tensor]:
    """LCM's boundary-condition scalings ``(c_skip, c_out)`` at discrete timesteps ``t``, Song et al. 2023, eq. 7."""
    scaled = torch.as_tensor(t, dtype=torch.float64) * timestep_scaling
    c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + LCM_SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def lcm_timesteps(steps: int, num_train_timesteps: int = 1000, original_steps: int = LCM_ORIGINAL_STEPS) -> Tensor:
    """The decreasing training timesteps of an LCM grid: ``steps`` evenly spaced indices into the ``original_steps``
    solver timesteps ``k - 1, 2k - 1, ..., T - 1`` (k = T // original_steps), as diffusers' ``LCMScheduler``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= original_steps:
        raise ValueError(f"steps={steps!r} is not allowed for the lcm sampler; allowed: 1 to {original_steps}")
    k = num_train_timesteps // original_steps
    solver = torch.arange(original_steps, 0, -1, dtype=torch.float64) * k - 1  # T - 1 first
    indices = torch.floor(torch.arange(steps, dtype=torch.float64) * (original_steps / steps)).long()
    return solver[indices]


def _vp_denoiser(denoiser: Denoiser) -> VPDenoiser | None:
    """The ``VPDenoiser`` under guidance and region wrappers (their ``denoiser`` attribute), if there is one."""
    seen = 0
    while denoiser is not None and seen < 16:
        if isinstance(denoiser, VPDenoiser):
            return denoiser
        denoiser, seen = getattr(denoiser, "denoiser", None), seen + 1
    return None


def sample_lcm(denoiser, x, sigmas, *, generator=None, callback=None, eta=None, **cond) -> Tensor:
    """Multistep latent consistency sampling, Luo et al. 2023, Alg. 3 (diffusers' LCMScheduler)."""
    # The boundary condition needs the discrete timestep: that of the VP network's schedule; a denoiser without one
    # (EDM, flow) is taken at t -> infinity, where c_skip = 0 and c_out = 1 (at t = 19 they are 7e-6 and 1 - 3e-6).
    x = _check(x, sigmas, generator)
    _eta("lcm", eta)
    vp = _vp_denoiser(denoiser)
    for i, (sigma, sigma_next) in enumerate(_pairs(sigmas)):
        denoised = denoiser(x, sigma, **cond)
        if vp is not None:
            t = vp.schedule.sigma_to_t(torch.tensor([sigma], dtype=torch.float64))[0]
            c_skip, c_out = (float(c) for c in consistency_scalings(t))
            denoised = c_out * denoised + (c_skip / math.sqrt(1 + sigma**2)) * x
        if callback is not None and callback(i, sigma, x, denoised) is True:
            return x
        x = denoised if sigma_next == 0 else denoised + randn_like(denoised, generator) * sigma_next
    return x


# -- the registry ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerInfo:
    """The facts about one sampler that the rest of unnoise reads (docs/samplers.md's table)."""

    name: str  # ours, as in ``sample(..., method)``, the CLI and the HTTP APIs
    fn: Callable[..., Tensor]
    eta: float = 0.0  # the default eta: the scale of the fresh noise each step adds (0: deterministic)
    eta_adjustable: bool = False  # whether a caller may pass another eta
    evals_per_step: int = 1  # network evaluations per step
    last_step_evals: int | None = None  # evaluations of the last step (to sigma 0); None: evals_per_step
    a1111_name: str | None = None  # AUTOMATIC1111's name ("Sampler:" in PNG parameters); None: it has none
    diffusers_name: str | None = None  # the diffusers scheduler class that runs the same algorithm
    diffusers_config: tuple[tuple[str, Any], ...] = ()  # config entries that select it within that class

    @property
    def stochastic(self) -> bool:
        """Whether it draws fresh noise from ``generator`` at its default eta."""
        return self.eta > 0

    def nfe(self, steps: int) -> int:
        """Network evaluations over ``steps`` steps ending at sigma 0."""
        last = self.evals_per_step if self.last_step_evals is None else self.last_step_evals
        return (steps - 1) * self.evals_per_step + last


SAMPLER_INFO: dict[str, SamplerInfo] = {
    info.name: info
    for info in (
        SamplerInfo("ddpm", sample_ddpm, eta=1.0, diffusers_name="DDPMScheduler"),
        SamplerInfo("ddim", sample_ddim, eta_adjustable=True, a1111_name="DDIM", diffusers_name="DDIMScheduler"),
        SamplerInfo("euler", sample_euler, a1111_name="Euler", diffusers_name="EulerDiscreteScheduler"),
        SamplerInfo(
            "euler_a",
            sample_euler_a,
            eta=1.0,
            eta_adjustable=True,
            a1111_name="Euler a",
            diffusers_name="EulerAncestralDiscreteScheduler",
        ),
        SamplerInfo(
            "heun",
            sample_heun,
            evals_per_step=2,
            last_step_evals=1,
            a1111_name="Heun",
            diffusers_name="HeunDiscreteScheduler",
        ),
        SamplerInfo("dpmpp_2m", sample_dpmpp_2m, a1111_name="DPM++ 2M", diffusers_name="DPMSolverMultistepScheduler"),
        SamplerInfo(
            "dpmpp_2m_sde",
            sample_dpmpp_2m_sde,
            eta=1.0,
            eta_adjustable=True,
            a1111_name="DPM++ 2M SDE",
            diffusers_name="DPMSolverMultistepScheduler",
            diffusers_config=(("algorithm_type", "sde-dpmsolver++"),),
        ),
        SamplerInfo("unipc", sample_unipc, a1111_name="UniPC", diffusers_name="UniPCMultistepScheduler"),
        SamplerInfo("gauss_pc", sample_gauss_pc),
        SamplerInfo("lcm", sample_lcm, eta=1.0, a1111_name="LCM", diffusers_name="LCMScheduler"),
    )
}
SAMPLERS: dict[str, Callable[..., Tensor]] = {name: info.fn for name, info in SAMPLER_INFO.items()}
STOCHASTIC = tuple(name for name, info in SAMPLER_INFO.items() if info.stochastic)


def sample(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    method: str,
    *,
    generator: Generator = None,
    callback: Callback | None = None,
    eta: float | None = None,
    **cond: Any,
) -> Tensor:
    """Run the sampler named ``method`` (a key of ``SAMPLERS``) from ``x`` at ``sigmas[0]`` to ``sigmas[-1]``."""
    check_choice("sampler", method, tuple(SAMPLERS))
    return SAMPLERS[method](denoiser, x, sigmas, generator=generator, callback=callback, eta=eta, **cond)


def nfe(method: str, steps: int) -> int:
    """Network evaluations a sampler makes over ``steps`` steps ending at sigma 0 (Heun: two per step but the last)."""
    check_choice("sampler", method, tuple(SAMPLERS))
    return SAMPLER_INFO[method].nfe(steps)
