"""Building blocks against diffusers' blocks of the same name on copied weights, and their memory behaviour."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention as DiffusersAttention
from diffusers.models.resnet import ResnetBlock2D as DiffusersResnet
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from unnoise.models import layers
from unnoise.models.layers import (
    GEGLU,
    GroupNorm32,
    ResnetBlock2D,
    SpatialAttention,
    Transformer2D,
    Upsample2D,
    timestep_embedding,
)


def copy_and_compare(ours, theirs, *args):
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        a, b = ours(*args), theirs(*args)
    b = b.sample if hasattr(b, "sample") else b
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("norm", ["default", "scale_shift"])
def test_resnet_block_matches_diffusers(norm):
    torch.manual_seed(0)
    kw = dict(temb_channels=128, time_embedding_norm=norm, output_scale_factor=1.5)
    theirs = DiffusersResnet(in_channels=64, out_channels=96, **kw)
    copy_and_compare(ResnetBlock2D(64, 96, **kw), theirs, torch.randn(2, 64, 8, 8), torch.randn(2, 128))


@pytest.mark.parametrize("linear", [False, True])
def test_spatial_transformer_matches_diffusers(linear):
    torch.manual_seed(0)
    theirs = Transformer2DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=64,
        cross_attention_dim=48,
        use_linear_projection=linear,
        num_layers=2,
    )
    ours = Transformer2D(64, 4, 16, context_dim=48, use_linear_projection=linear, depth=2)
    copy_and_compare(ours, theirs, torch.randn(2, 64, 8, 8), torch.randn(2, 7, 48))


def test_spatial_attention_matches_diffusers():
    torch.manual_seed(0)
    theirs = DiffusersAttention(
        64,
        heads=2,
        dim_head=32,
        rescale_output_factor=2.0,
        residual_connection=True,
        bias=True,
        norm_num_groups=32,
        eps=1e-6,
    )
    copy_and_compare(
        SpatialAttention(64, heads=2, dim_head=32, rescale_output_factor=2.0), theirs, torch.randn(2, 64, 8, 8)
    )


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.5, 999.0])
    for flip, shift in [(True, 0.0), (False, 1.0)]:
        expected = get_timestep_embedding(t, 33, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        torch.testing.assert_close(timestep_embedding(t, 33, flip_sin_to_cos=flip, freq_shift=shift), expected)


@pytest.mark.parametrize("linear", [False, True])
def test_transformer_output_keeps_the_input_memory_format(linear):
    """A channels-last result after a contiguous input made every later conv reorder its weights (2x peak memory)."""
    block = Transformer2D(64, 4, 16, context_dim=48, use_linear_projection=linear).eval()
    x, ctx = torch.randn(2, 64, 8, 8), torch.randn(2, 7, 48)
    with torch.no_grad():
        out = block(x, ctx)
        assert out.is_contiguous()
        out_cl = block(x.to(memory_format=torch.channels_last), ctx)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, out)


def test_geglu_inference_path_equals_the_autograd_path():
    layer = GEGLU(16, 32)
    x = torch.randn(3, 5, 16)
    with torch.inference_mode():
        fast = layer(x)
    slow = layer(x.requires_grad_())
    torch.testing.assert_close(fast, slow.detach())
    slow.sum().backward()
    assert x.grad is not None


def test_attention_modes_agree_and_auto_dispatches_by_length(monkeypatch):
    from unnoise.models import layers

    torch.manual_seed(0)
    for tokens in (16, 100):  # 16 x 16 pairs: plain products under "auto"; 100 x 100: SDPA
        q, k, v = (torch.randn(2, 3, tokens, 8) for _ in range(3))
        expected = F.scaled_dot_product_attention(q, k, v)
        for mode, chunk in (("chunked", 1024), ("chunked", 7), ("auto", 1024)):
            torch.testing.assert_close(layers.attention(q, k, v, mode, chunk), expected, atol=1e-5, rtol=0)
    calls = []
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", lambda *a: calls.append(a[0].shape[-2]) or a[0])
    layers.attention(*(torch.randn(1, 1, 64, 4) for _ in range(3)), "auto")  # 64 x 64 pairs: the limit, plain
    layers.attention(*(torch.randn(1, 1, 65, 4) for _ in range(3)), "auto")
    assert calls == [65]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale, shift", [(1.0, 0.0), (50.0, 300.0), (0.01, 0.0)])
def test_half_group_norm_has_float32_statistics_on_both_paths(monkeypatch, dtype, scale, shift):
    """CPU/CUDA run the native half kernel (it accumulates in float32); other backends upcast explicitly. Both are
    within one rounding of the output of a float64 reference, also where half-precision sums would overflow."""
    torch.manual_seed(0)
    norm = GroupNorm32(8, 32, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    norm = norm.to(dtype)
    x = (torch.randn(2, 32, 64, 64) * scale + shift).to(dtype)  # 16384 elements per group: sums of x^2 overflow fp16
    reference = F.group_norm(x.double(), 8, norm.weight.double(), norm.bias.double(), 1e-6)
    native = norm(x)
    monkeypatch.setattr(layers, "NATIVE_HALF_DEVICES", ())
    upcast = norm(x)
    ulp = torch.finfo(dtype).eps
    for out in (native, upcast):
        assert out.dtype == dtype
        assert ((out.double() - reference).abs() <= ulp * reference.abs().clamp(min=1)).all()
    assert ((native.float() - upcast.float()).abs() <= ulp * upcast.float().abs().clamp(min=1)).all()


def test_bf16_upsample_native_equals_upcast(monkeypatch):
    torch.manual_seed(0)
    up = Upsample2D(8).to(torch.bfloat16)
    x = torch.randn(2, 8, 5, 7).to(torch.bfloat16)
    native = up(x)
    monkeypatch.setattr(layers, "NATIVE_HALF_DEVICES", ())
    assert torch.equal(native, up(x))
