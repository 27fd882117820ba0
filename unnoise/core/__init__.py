"""The diffusion core: schedules, seeded noise, denoisers, losses, samplers and guidance, all over one interface
``D(x, sigma, **cond) -> x0_hat``. It imports no network, no pipeline and no server."""

from unnoise.core.denoisers import EDMDenoiser, FlowDenoiser, VPDenoiser, score
from unnoise.core.guidance import CFGDenoiser
from unnoise.core.losses import DiffusionLoss, edm_loss, flow_loss, loss_for, vp_loss
from unnoise.core.noise import randn_like
from unnoise.core.samplers import SAMPLERS, sample
from unnoise.core.schedules import SPACINGS, VPSchedule, add_noise

__all__ = [
    "SAMPLERS",
    "SPACINGS",
    "CFGDenoiser",
    "DiffusionLoss",
    "EDMDenoiser",
    "FlowDenoiser",
    "VPDenoiser",
    "VPSchedule",
    "add_noise",
    "edm_loss",
    "flow_loss",
    "loss_for",
    "randn_like",
    "sample",
    "score",
    "vp_loss",
]
