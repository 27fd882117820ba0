"""Feature caching (DeepCache) in the U-Net: interval 1 is the plain network bit for bit, a reusing call equals the
plain network with the cached features substituted by a hook, the call pattern, and the errors."""

import pytest
import torch

from unnoise.models.unet import UNet, UNetConfig

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
