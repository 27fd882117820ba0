"""One sampler run for several requests that share ``GenerationSpec.batch_key`` (size, steps, sampler, guidance).

Each request keeps what it would get alone: its prompt and negative prompt, one generator per image seeded
``seed + i``, and its images' parameters as ``Pipeline.__call__`` writes them (batch size and position within the
request, not within the server's batch), so an image regenerates from its PNG with ``unnoise generate``. The pieces
are the pipeline's own steps (grid, initial noise, sampling, decoding, parameters; its conditioning rule, with one
encoder call for all prompts), concatenated along the batch; a batched image equals the unbatched one up to float
rounding (at most 1/255, as within one pipeline call). The pipeline has no multi-prompt call yet; when it gets
one, this file becomes a call to it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from unnoise.core.denoisers import VPDenoiser
from unnoise.core.guidance import CFGDenoiser
from unnoise.pipeline.inputs import Request, resolve_request
from unnoise.pipeline.pipeline import Pipeline, _UNetModel
from unnoise.serve.validation import GenerationSpec

# step(step, total, sigma) -> True stops the whole run (Pipeline raises GenerationCancelled).
StepCallback = Callable[[int, int, float], bool | None]
_CALL_DEFAULTS = {k: p.default for k, p in inspect.signature(Pipeline.__call__).parameters.items() if k != "self"}


def generate_batch(
    pipe: Pipeline, specs: Sequence[GenerationSpec], callback: StepCallback | None = None
) -> list[list[Image.Image]]:
    """Images of each spec (a list per spec, in order) from one sampler run over all their images."""
    if not specs or any(s.batch_key != specs[0].batch_key for s in specs):
        raise ValueError("generate_batch needs one or more specs with equal batch_key")
    reqs = [resolve_request(pipe, {**_CALL_DEFAULTS, **spec.call_arguments()}) for spec in specs]
    first = reqs[0]
    with torch.no_grad():
        schedule, sigmas = pipe._grid(first)
        quantize = pipe.config.sampling.quantize and first.spacing == "karras"
        vp = VPDenoiser(_UNetModel(pipe.unet), schedule, pipe.config.prediction, quantize=quantize)
        x, generators, cond, uncond = _inputs(pipe, reqs, sigmas, vp.prior_std(sigmas[0].item()))
        space = "v" if pipe.config.prediction == "v_prediction" else "epsilon"
        denoiser = CFGDenoiser(
            vp, first.guidance_scale, uncond, first.guidance_rescale, first.guidance_interval, rescale_space=space
        )
        on_step = None if callback is None else (lambda i, total, sigma, preview: callback(i, total, sigma))
        x = pipe._sample(denoiser, x, sigmas, first.sampler, generators, on_step, cond)
        images = pipe.decode(x)
    out, start = [], 0
    for req in reqs:
        mine = images[start : start + req.num_images]
        for i, image in enumerate(mine):
            image.info["parameters"] = pipe._parameters(req, i)
        out.append(mine)
        start += req.num_images
    return out


def _inputs(
    pipe: Pipeline, reqs: list[Request], sigmas: torch.Tensor, prior_std: float
) -> tuple[torch.Tensor, list[torch.Generator], dict[str, Any], dict[str, Any]]:
    """(initial state, generators, cond, uncond) of all requests, concatenated along the batch."""
    xs, generators = [], []
    for req in reqs:
        mine = [torch.Generator().manual_seed(req.seed + i) for i in range(req.num_images)]
        xs.append(pipe._start(req, sigmas, mine, prior_std)[0])
        generators += mine
    # Pipeline._conditioning's rule, with each distinct text encoded once for the whole batch: one encoder call
    # instead of one per request (the encoder costs about as much as a sampler step of a small model).
    negatives = [None if r.guidance_scale == 1.0 or r.negative_prompt is None else r.negative_prompt for r in reqs]
    texts = sorted({r.prompt for r in reqs} | {n for n in negatives if n is not None})
    encoded = dict(zip(texts, pipe.text_encoder.encode(texts).hidden_states.to(pipe.device), strict=True))
    empty = pipe.text_encoder.empty().hidden_states[0].to(pipe.device)
    hidden = [encoded[r.prompt].expand(r.num_images, -1, -1) for r in reqs]
    negative = [(empty if n is None else encoded[n]).expand(r.num_images, -1, -1) for r, n in zip(reqs, negatives)]
    cond = {"encoder_hidden_states": torch.cat(hidden)}
    uncond = {"encoder_hidden_states": torch.cat(negative)}
    return torch.cat(xs), generators, cond, uncond
