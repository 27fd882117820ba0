"""The embedded latent consistency student ("lcm", unnoise/weights/mnist-lcm): it loads by name through the library,
the CLI and the server, samples the prompted digits in its default single step (one U-Net call), and
refuses what a model without an unconditional pass cannot do. Also the VAE dtype rule both loaders share."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from helpers import run_cli
from PIL import Image
from test_serve import ThreadServer, pixels, png_parameters, post

from unnoise import cli
from unnoise.models.classifier import load_classifier
from unnoise.pipeline import Pipeline
from unnoise.pipeline.loading import EMBEDDED_MODELS, vae_dtype
from unnoise.serve.config import ServeConfig

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("lcm")


def test_the_student_loads_by_name_with_its_sampling_defaults(pipe):
    assert EMBEDDED_MODELS["lcm"].name == "mnist-lcm"
    sampling = pipe.config.sampling
    assert (sampling.sampler, sampling.steps, sampling.guidance_scale) == ("lcm", 1, 3.0)
    assert pipe.guidance_embedded and pipe.unet.config.time_cond_proj_dim == 256


@pytest.mark.parametrize("steps", [1, 2])
def test_its_steps_draw_the_prompted_digits_with_one_unet_call_each(pipe, monkeypatch, steps):
    """The model card measures 99.2% adherence at 1 step and 99.8% at 2 over 1000 images; 20 images (2 per digit)
    may miss one at most."""
    calls = []
    forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda x, *a, **k: calls.append(x.shape[0]) or forward(x, *a, **k))
    settings = {} if steps == 1 else {"steps": steps}  # 1 step: the default
    images = [
        image for d in range(10) for image in pipe(f"a handwritten {DIGITS[d]}", num_images=2, seed=100 + d, **settings)
    ]
    assert calls == [2] * 10 * steps  # `steps` per call, the batch of 2 images, no unconditional half
    classifier = load_classifier()
    batch = torch.tensor(np.stack([np.asarray(i.convert("L"), np.float32) / 127.5 - 1 for i in images]))[:, None]
    with torch.no_grad():
        read = classifier.predict(batch).tolist()
    assert sum(r == d // 2 for d, r in enumerate(read)) >= 19, read


def test_a_negative_prompt_is_refused_by_name(pipe):
    with pytest.raises(ValueError, match=r"negative_prompt='blurry' is not allowed; this model takes the guidance"):
        pipe("a handwritten 3", negative_prompt="blurry", seed=0)


def test_the_cli_generates_with_it(pipe, tmp_path, capsys):
    code, _, err = run_cli(cli.main, capsys, "generate", "a handwritten 5", "--model", "lcm", "--seed", "7",
                           "--output", str(tmp_path))  # fmt: skip
    assert code == 0, err
    (written,) = tmp_path.glob("*.png")
    expected = pipe("a handwritten 5", seed=7)[0]
    assert np.array_equal(np.asarray(Image.open(written)), np.asarray(expected))


def test_the_server_serves_it_by_name(pipe, tmp_path):
    config = ServeConfig(model=Path("lcm"), db=tmp_path / "jobs.sqlite3", warmup=False, safety=False, threads=1)
    with ThreadServer(config) as server:
        r = post(
            server.base, "/v1/images/generations", {"prompt": "a handwritten 8", "seed": 4, "response_format": "url"}
        )
        assert r.status_code == 200, r.text
        data = requests.get(r.json()["data"][0]["url"], timeout=30).content
        params = png_parameters(data)
        assert (params["sampler"], params["steps"]) == ("lcm", 1), params
        assert np.abs(pixels(data) * 255 - np.asarray(pipe("a handwritten 8", seed=4)[0], np.float64)).max() <= 1
        r = post(server.base, "/v1/images/generations", {"prompt": "a 1", "negative_prompt": "blurry"})
        assert r.status_code == 422 and "negative_prompt" in r.text, r.text


def test_the_vae_is_upcast_for_sdxl_only():
    """diffusers' SDXL pipelines run a force_upcast VAE in float32, its SD 1.x/2.x pipelines ignore the flag (which
    AutoencoderKL defaults to True)."""
    sd, sdxl = SimpleNamespace(addition_embed_type=None), SimpleNamespace(addition_embed_type="text_time")
    upcast, plain = SimpleNamespace(force_upcast=True), SimpleNamespace(force_upcast=False)
    for half in (torch.float16, torch.bfloat16):
        assert vae_dtype(sd, upcast, half) == half and vae_dtype(sdxl, plain, half) == half
        assert vae_dtype(sdxl, upcast, half) == torch.float32
    assert vae_dtype(sdxl, upcast, torch.float32) == torch.float32
    default = Pipeline.from_pretrained("default").to(dtype=torch.bfloat16)
    assert default.vae.config.force_upcast and default.vae.dtype == torch.bfloat16
