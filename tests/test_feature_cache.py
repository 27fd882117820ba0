"""Feature caching (DeepCache) in the U-Net: interval 1 is the plain network bit for bit, a reusing call equals the
plain network with the cached features substituted by a hook, the call pattern, and the errors."""

import numpy as np
import pytest
import torch
from helpers import run_cli
from PIL import Image

from unnoise import cli
from unnoise.core.samplers import SAMPLERS, nfe
from unnoise.models.unet import UNet, UNetConfig
from unnoise.pipeline import Pipeline, Request
from unnoise.pipeline.png import parse_parameters as read_parameters_text
from unnoise.pipeline.png import read_png_parameters, save_png

# SD-shaped at a reduced width: cross-attention down levels, a plain innermost level, two layers per block.
SD_LIKE = UNetConfig(
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32, 32),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=12,
    attention_head_dim=4,
    norm_num_groups=8,
)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = UNet(SD_LIKE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def call_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, 12, generator=g)


def reference_reuse(unet, depth, first, second):
    """The plain network on ``second`` with the input of its last ``depth`` up blocks replaced by what the plain
    network computed there on ``first``: what a reusing call must return."""
    block = unet.up_blocks[-depth]
    seen = []
    hook = block.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        unet(*first[:1], first[1], first[2])
    hook.remove()
    hook = block.register_forward_pre_hook(lambda module, args: (seen[0], *args[1:]))
    with torch.no_grad():
        out = unet(second[0], second[1], second[2])
    hook.remove()
    return out


def test_interval_one_is_the_plain_network_bit_for_bit(unet):
    calls = [(*call_inputs(s), t) for s, t in ((1, 900.0), (2, 700.0), (3, 500.0))]
    with torch.no_grad():
        plain = [unet(x, t, c) for x, c, t in calls]
        with unet.caching(1) as cache:
            cached = [unet(x, t, c) for x, c, t in calls]
    assert all(torch.equal(a, b) for a, b in zip(plain, cached, strict=True))
    assert (cache.full_calls, cache.reused_calls) == (3, 0)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_a_reusing_call_runs_the_outer_levels_on_the_cached_features(unet, depth):
    (x1, c1), (x2, c2) = call_inputs(1), call_inputs(2)
    expected = reference_reuse(unet, depth, (x1, 800.0, c1), (x2, 760.0, c2))
    with torch.no_grad(), unet.caching(2, depth=depth) as cache:
        unet(x1, 800.0, c1)
        reused = unet(x2, 760.0, c2)
    assert (cache.full_calls, cache.reused_calls) == (1, 1)
    torch.testing.assert_close(reused, expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        full = unet(x2, 760.0, c2)
    assert (reused - full).abs().max() > 1e-3  # reuse is an approximation, not the full network


def test_calls_follow_the_interval_the_range_and_the_input_signature(unet):
    x, c = call_inputs(1)
    pattern = []
    with torch.no_grad(), unet.caching(3, t_range=(100.0, 900.0)) as cache:
        for t in (950.0, 850.0, 800.0, 750.0, 700.0, 650.0, 600.0, 50.0, 40.0):
            before = cache.reused_calls
            unet(x, t, c)
            pattern.append("R" if cache.reused_calls > before else "F")
        assert "".join(pattern) == "FRRFRRFFF"  # 950, 50 and 40 lie outside the range: always full
        unet(x[:1], 600.0, c[:1])  # another batch size: the cache cannot serve it
        assert cache.reused_calls == 4 and cache.full_calls == 6
    assert unet.feature_cache is None


def test_errors_name_the_setting(unet):
    with pytest.raises(ValueError, match="cache_interval=0"):
        unet.caching(0).__enter__()
    with pytest.raises(ValueError, match="depth=4 .*3 levels"):
        unet.caching(2, depth=4).__enter__()
    with pytest.raises(ValueError, match="t_range"):
        unet.caching(2, t_range=(5.0, 1.0)).__enter__()
    with unet.caching(2), pytest.raises(RuntimeError, match="already has a feature cache"):
        unet.caching(2).__enter__()


# -- through the pipeline (the embedded default model) ------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("default")


def pixels(images):
    return [np.asarray(image) for image in images]


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_a_cache_of_interval_one_changes_no_sampler_bit(pipe, sampler):
    settings = dict(steps=4, sampler=sampler, seed=3)
    plain = pixels(pipe("a handwritten three", **settings))
    with pipe.unet.caching(1) as cache:  # the cache's code path, never reusing
        cached = pixels(pipe("a handwritten three", **settings))
    assert all(np.array_equal(a, b) for a, b in zip(plain, cached, strict=True))
    assert cache.full_calls == nfe(sampler, 4) and cache.reused_calls == 0


def test_the_pipeline_caches_every_nth_call_within_the_sigma_range_and_records_it(pipe, tmp_path):
    settings = dict(steps=6, sampler="dpmpp_2m", seed=4)
    plain = pipe("a handwritten five", **settings)[0]
    calls = []
    forward = pipe.unet.forward

    def counting(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append(pipe.unet.feature_cache.reused_calls)
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipe.unet, "forward", counting)
        cached = pipe("a handwritten five", cache_interval=3, **settings)[0]
    assert calls == [0, 1, 2, 2, 3, 4]  # full, reuse, reuse, full, reuse, reuse
    assert pipe.unet.feature_cache is None
    assert not np.array_equal(np.asarray(cached), np.asarray(plain))
    # a range that holds none of the grid's sigmas: every call is full, so the image is the plain one
    high = pipe("a handwritten five", cache_interval=3, cache_range=(1e3, 2e3), **settings)[0]
    assert np.array_equal(np.asarray(high), np.asarray(plain))
    # a range holding all of them: the same as no range
    wide = pipe("a handwritten five", cache_interval=3, cache_range=(0.0, 1e3), **settings)[0]
    assert np.array_equal(np.asarray(wide), np.asarray(cached))
    parameters = read_parameters_text(cached.info["parameters"])
    assert parameters["cache_interval"] == 3 and "cache_range" not in parameters
    path = tmp_path / "cached.png"
    save_png(wide, path)
    assert read_png_parameters(path)["cache_range"] == (0.0, 1e3)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(cache_interval=0), r"cache_interval=0 is not allowed; expected an integer >= 1"),
        (dict(cache_interval=2.5), r"cache_interval=2.5 is not allowed"),
        (dict(cache_range=(3.0, 1.0)), r"cache_range=\(3.0, 1.0\) is not allowed; expected \(sigma_lo, sigma_hi\)"),
    ],
)
def test_bad_cache_settings_name_the_field(pipe, change, match):
    with pytest.raises(ValueError, match=match):
        pipe("a handwritten five", steps=2, **change)


def test_requests_with_other_cache_settings_do_not_share_a_pass(pipe):
    with pytest.raises(ValueError, match="cache_interval"):
        pipe.generate([Request("a one", steps=2), Request("a two", steps=2, cache_interval=2)])


def test_the_cli_cache_flags_reach_the_request_and_replay_from_the_png(capsys, pipe, tmp_path):
    argv = ("generate", "a handwritten nine", "-o", tmp_path, "--steps", 4, "--seed", 2, "--no-safety")
    status, out, err = run_cli(cli.main, capsys, *argv, "--cache", 2, "--cache-range", 0.5, 20)
    assert status == 0, err
    path = out.split()[0]
    expected = pipe("a handwritten nine", steps=4, seed=2, cache_interval=2, cache_range=(0.5, 20.0))[0]
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(expected))
    params = read_png_parameters(path)
    assert (params["cache_interval"], params["cache_range"]) == (2, (0.5, 20.0))
    status, out, err = run_cli(
        cli.main, capsys, "generate", "-o", tmp_path / "again", "--from-png", path, "--no-safety"
    )
    assert status == 0, err
    assert np.array_equal(np.asarray(Image.open(out.split()[0])), np.asarray(expected))
    status, _, err = run_cli(cli.main, capsys, *argv, "--cache", 0)
    assert status == 2 and "argument --cache: cache_interval=0 is not allowed" in err
