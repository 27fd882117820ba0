"""Building blocks against diffusers' blocks of the same name on copied weights, and their memory behaviour."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention as DiffusersAttention
from diffusers.models.resnet import ResnetBlock2D as DiffusersResnet
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from unnoise.models import layers, packing
from unnoise.models.layers import (
    GEGLU,
    GroupNorm32,
    ResnetBlock2D,
    SpatialAttention,
    Transformer2D,
    Upsample2D,
    timestep_embedding,
)

# oneDNN's bf16 kernels (AVX-512 or AMX): where the CPU has none (AVX2), bf16 convolutions run PyTorch's own and
# nothing is packed. The tests assert whichever the CPU does, so that they pass on every CPU.
BF16_PACKS = packing.onednn_runs(torch.bfloat16, "cpu")


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


@pytest.mark.parametrize("rows", [7, 15, 16, None])
def test_feed_forward_in_token_chunks_equals_the_whole_sequence(rows, monkeypatch):
    """Without autograd the MLP runs over chunks of ``chunk_rows`` tokens (batch items together): every token's
    result is the one the whole (B, N, C) sequence gives, whether the chunks divide it or not."""
    layer = layers.FeedForward(16)
    x = torch.randn(3, 5, 16)
    expected = layer(x).detach()  # autograd: the whole sequence at once
    calls = []
    monkeypatch.setattr(layer, "_mlp", lambda t, f=layer._mlp: calls.append(t.shape[0]) or f(t))
    layer.chunk_rows = rows
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert got.shape == x.shape
    assert calls == ([3] if rows in (15, 16, None) else [7, 7, 1])  # [3]: one call on the whole (3, 5, 16) input


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


def _upsamplers(channels: int, seed: int = 0) -> tuple[Upsample2D, Upsample2D]:
    torch.manual_seed(seed)
    fused = Upsample2D(channels)
    plain = Upsample2D(channels, fused=False)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.fixture(params=["phase", "transposed"])
def fused_path(request, monkeypatch):
    """Both fused algorithms on the CPU: phase convolutions (the CPU's) and the transposed convolution (CUDA's)."""
    if request.param == "transposed":
        monkeypatch.setattr(layers, "PHASE_CONV_DEVICES", ())
    return request.param


@pytest.mark.parametrize("shape", [(1, 8, 5, 7), (3, 16, 8, 8), (2, 4, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("packed", [True, False, "in_place"])
def test_fused_upsample_equals_interpolate_then_conv(fused_path, shape, channels_last, packed):
    """One convolution on the low-resolution map = nearest 2x then the 3x3 conv, with the weights packed for oneDNN
    (the CPU's default; beside the weights or in place of them) or not."""
    fused, plain = _upsamplers(shape[1])
    for module in (fused, plain):
        packing.set_weight_packing(module, bool(packed), in_place=packed == "in_place")
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        got, want = fused(x), plain(x)
        again = fused(x)  # from the kept fused kernel
    assert got.shape == want.shape == (shape[0], shape[1], 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert torch.equal(again, got)
    if packed:  # oneDNN's packed convolutions answer channels-last
        assert want.is_contiguous(memory_format=torch.channels_last)
        if fused_path == "phase":
            assert got.is_contiguous(memory_format=torch.channels_last)
        return
    for layout in (torch.channels_last, torch.contiguous_format):  # the layout the two-step path gives
        assert got.is_contiguous(memory_format=layout) == want.is_contiguous(memory_format=layout)


def test_fused_upsample_kernel_by_hand():
    """Output pixel (2i + a) sees input rows i - 1, i (phase 0) or i, i + 1 (phase 1), with the 3x3 kernel's rows
    summed where nearest upsampling repeats a row; written out for a 1x1-channel kernel k[r, c] = 3r + c."""
    w = torch.arange(9.0).reshape(1, 1, 3, 3)
    kernel = layers.upsample_conv_weight(w)[0, 0]
    rows = ([2], [1, 2], [0, 1], [0])  # transposed-convolution tap -> 3x3 kernel rows summed into it
    want = [[sum(3 * r + c for r in rows[p] for c in rows[q]) for q in range(4)] for p in range(4)]
    assert kernel.tolist() == want
    x = torch.randn(1, 1, 3, 4)
    plain = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, padding=1)
    torch.testing.assert_close(F.conv_transpose2d(x, kernel[None, None], stride=2, padding=1), plain)
    with pytest.raises(ValueError, match="upsample_conv_weight needs a 3x3 kernel, got shape"):
        layers.upsample_conv_weight(torch.zeros(1, 1, 5, 5))


def test_fused_upsample_phase_weights_by_hand():
    """Phase (a, b) of output pixel (2i + a, 2j + b): taps summed over the 3x3 kernel rows/columns it repeats."""
    w = torch.arange(9.0).reshape(1, 1, 3, 3)  # k[r, c] = 3r + c
    phases = layers.upsample_phase_weight(w)[:, 0]
    rows = {0: [[0], [1, 2]], 1: [[0, 1], [2]]}  # phase -> kernel rows summed into window rows 0 and 1
    for a in (0, 1):
        for b in (0, 1):
            want = [[sum(3 * r + c for r in rows[a][i] for c in rows[b][j]) for j in (0, 1)] for i in (0, 1)]
            assert phases[2 * a + b].tolist() == want
    with pytest.raises(ValueError, match="upsample_phase_weight needs a 3x3 kernel, got shape"):
        layers.upsample_phase_weight(torch.zeros(1, 1, 5, 5))


@pytest.mark.parametrize("in_place", [False, True])
def test_fused_upsample_gradients_equal_and_kept_weights_follow_changes(fused_path, in_place):
    fused, plain = _upsamplers(6, seed=1)
    packing.set_weight_packing(fused, True, in_place=in_place)
    x = torch.randn(2, 6, 4, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(2, 6, 8, 10)
    (fused(x) * g).sum().backward()
    (plain(x2) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=2e-5, rtol=0)
    torch.testing.assert_close(fused.conv.weight.grad, plain.conv.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(fused.conv.bias.grad, plain.conv.bias.grad, atol=1e-4, rtol=1e-5)
    y = torch.randn(1, 6, 3, 3)
    with torch.no_grad():
        fused(y)  # keeps the fused kernel
        for module in (fused, plain):  # an optimizer-like in-place update
            module.conv.weight.mul_(-0.5)
        torch.testing.assert_close(fused(y), plain(y), atol=2e-5, rtol=0)
        fused.load_state_dict(_upsamplers(6, seed=2)[0].state_dict())
        plain.load_state_dict(fused.state_dict())
        torch.testing.assert_close(fused(y), plain(y), atol=2e-5, rtol=0)
        fused.to(torch.bfloat16), plain.to(torch.bfloat16)
        got, want = fused(y.bfloat16()), plain(y.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02)
    assert plain.fused_weight_bytes() == 0 and fused.phase_kernel_bytes() == 16 * 6 * 6 * 2
    if in_place and fused_path == "phase" and BF16_PACKS:  # only the packed phase kernel is kept
        assert fused._cache is None and fused.fused_weight_bytes() == 0
        assert packing.kept_packed_bytes(fused) == packing.packed_weight_bytes(fused) == fused.phase_kernel_bytes()
    else:
        assert fused.fused_weight_bytes() == fused.phase_kernel_bytes()


def test_set_upsample_fusion_switches_every_upsampler():
    model = torch.nn.Sequential(Upsample2D(4), torch.nn.Sequential(Upsample2D(4, fused=False)))
    layers.set_upsample_fusion(model, False)
    assert [m.fused for m in model.modules() if isinstance(m, Upsample2D)] == [False, False]
    layers.set_upsample_fusion(model, True)
    assert [m.fused for m in model.modules() if isinstance(m, Upsample2D)] == [True, True]
    with pytest.raises(ValueError, match="enabled='yes' must be True or False"):
        layers.set_upsample_fusion(model, "yes")


def test_fused_kernel_follows_the_conv_weight_layout():
    """A channels-last model gets a channels-last kernel: no per-call reorder copy of the weight."""
    up = Upsample2D(8).to(memory_format=torch.channels_last)
    for build in (layers.upsample_conv_weight, layers.upsample_phase_weight):
        assert build(up.conv.weight).is_contiguous(memory_format=torch.channels_last)
        assert build(Upsample2D(8).conv.weight).is_contiguous()


# -- weights packed for oneDNN (CPU inference) ----------------------------------------------------------------------


def _conv(c_in: int, c_out: int, k: int, seed: int = 0, **kwargs) -> packing.Conv2d:
    torch.manual_seed(seed)
    return packing.Conv2d(c_in, c_out, k, **kwargs)


@pytest.mark.parametrize(
    "c_in, c_out, k, kwargs",
    [(16, 24, 3, {"padding": 1}), (8, 8, 3, {"stride": 2}), (12, 20, 1, {}), (8, 16, 3, {"padding": 1, "bias": False})],
)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_conv_equals_pytorch_conv(c_in, c_out, k, kwargs, channels_last, dtype):
    conv = _conv(c_in, c_out, k, **kwargs).to(dtype)
    x = torch.randn(2, c_in, 9, 10).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    want = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    with torch.no_grad():
        got = conv(x)
    packs = packing.onednn_runs(dtype, "cpu")
    assert ("_packed" in conv.__dict__) == packs and got.dtype == dtype
    if packs:
        assert got.is_contiguous(memory_format=torch.channels_last)  # oneDNN's layout; the models restore the input's
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # the same bfloat16 products, summed in float32 in another order: at most a rounding or two apart
        assert ((got.float() - want.float()).abs() <= 2 * 2**-8 * want.float().abs().clamp(min=1)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_linear_equals_pytorch_linear(dtype):
    torch.manual_seed(0)
    for bias in (True, False):
        linear = packing.Linear(24, 40, bias=bias).to(dtype)
        x = torch.randn(3, 7, 48)[..., ::2].to(dtype)  # 3-D and not contiguous
        with torch.no_grad():
            got, flat = linear(x), linear(x.reshape(21, 24))
        want = F.linear(x, linear.weight, linear.bias)
        assert got.dtype == dtype and "_packed" not in linear.__dict__  # nothing kept
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        torch.testing.assert_close(flat, want.reshape(21, 40), atol=tol, rtol=tol)


def test_packed_weight_follows_every_change_of_the_weight():
    conv = _conv(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 6, 6)
    plain = lambda: F.conv2d(x, conv.weight, conv.bias, padding=1)  # noqa: E731
    with torch.no_grad():
        first = conv(x)
        kept = conv._packed[2]
        assert torch.equal(conv(x), first) and conv._packed[2] is kept  # reused
        conv(torch.randn(2, 8, 6, 6))  # another input shape: packed for it
        assert conv._packed[2] is not kept
        conv.weight.mul_(2)  # in place: the version changes
        torch.testing.assert_close(conv(x), plain(), atol=1e-5, rtol=1e-5)
        conv.load_state_dict(_conv(8, 8, 3, seed=1, padding=1).state_dict())
        torch.testing.assert_close(conv(x), plain(), atol=1e-5, rtol=1e-5)
        conv.weight = torch.nn.Parameter(torch.randn_like(conv.weight))  # a new tensor
        torch.testing.assert_close(conv(x), plain(), atol=1e-5, rtol=1e-5)
        conv.to(torch.bfloat16)
        assert "_packed" not in conv.__dict__  # the copy of the float32 weight is gone with it
        assert conv(x.bfloat16()).dtype == torch.bfloat16 and ("_packed" in conv.__dict__) == BF16_PACKS
        assert not BF16_PACKS or conv._packed[2].dtype == torch.bfloat16


def test_packing_is_skipped_where_it_does_not_apply():
    conv = _conv(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    conv(x).sum().backward()  # autograd: PyTorch's conv, gradients as usual
    assert "_packed" not in conv.__dict__ and x.grad is not None and conv.weight.grad is not None
    with torch.no_grad():
        conv.half()(x.detach().half())  # float16: no oneDNN kernel on this CPU
        assert "_packed" not in conv.__dict__
        conv.float()
        with torch.autocast("cpu", torch.bfloat16):  # autocast does not reach oneDNN's ops: PyTorch's bf16 conv
            assert conv(x).dtype == torch.bfloat16 and "_packed" not in conv.__dict__
        conv.packed = False
        conv(x)
        assert "_packed" not in conv.__dict__
    with torch.inference_mode():
        frozen = _conv(4, 4, 3, padding=1)  # inference-tensor weights: in-place changes would go unseen
        frozen(x.detach())
        assert "_packed" not in frozen.__dict__


def test_packed_modules_copy_and_pickle_without_the_packed_weight(tmp_path):
    import copy

    model = torch.nn.Sequential(_conv(4, 8, 3, padding=1), layers.Upsample2D(8))
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        want = model(x)
        assert all("_packed" in m.__dict__ for m in (model[0], model[1]))
        clone = copy.deepcopy(model)
        assert not any("_packed" in m.__dict__ for m in clone.modules())
        torch.save(model, tmp_path / "model.pt")
        loaded = torch.load(tmp_path / "model.pt", weights_only=False)
        assert torch.equal(clone(x), want) and torch.equal(loaded(x), want)


def test_set_weight_packing_switches_every_layer_and_clears_the_kept_weights():
    model = torch.nn.ModuleList([ResnetBlock2D(32, 64, temb_channels=16), Transformer2D(64, 2, 16, context_dim=24)])
    x, temb, ctx = torch.randn(1, 32, 4, 4), torch.randn(1, 16), torch.randn(1, 5, 24)
    run = lambda: model[1](model[0](x, temb), ctx)  # noqa: E731
    with torch.no_grad():
        packed = run()
        resnet_convs = [model[0].conv1, model[0].conv2, model[0].conv_shortcut]
        expected = sum(c.weight.numel() * 4 for c in resnet_convs)  # the transformer's 1x1 projections keep nothing
        assert packing.packed_weight_bytes(model) == packing.kept_packed_bytes(model) == expected
        packing.set_weight_packing(model, False)
        assert packing.packed_weight_bytes(model) == packing.kept_packed_bytes(model) == 0
        assert not any(m.packed for m in model.modules() if isinstance(m, (packing.Conv2d, packing.Linear)))
        torch.testing.assert_close(run(), packed, atol=1e-5, rtol=1e-5)
        assert packing.kept_packed_bytes(model) == 0
        packing.set_weight_packing(model, True)
        torch.testing.assert_close(run(), packed, atol=0, rtol=0)
    with pytest.raises(ValueError, match="enabled='no' must be True or False"):
        packing.set_weight_packing(model, "no")


def test_packed_weight_bytes_counts_the_fused_upsamplers_phase_kernel():
    up = layers.Upsample2D(8)
    with torch.no_grad():
        up(torch.randn(1, 8, 4, 4))
    assert packing.packed_weight_bytes(up) == up.fused_weight_bytes() == packing.kept_packed_bytes(up)
    assert up._packed[2].numel() * 4 == up.fused_weight_bytes()
    assert packing.packed_weight_bytes(up.half()) == 0


def _in_place_conv(seed: int = 0) -> packing.Conv2d:
    conv = _conv(8, 16, 3, seed=seed, padding=1)
    packing.set_weight_packing(conv, True, in_place=True)
    return conv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_packing_replaces_the_weight_and_gives_it_back_bit_for_bit(dtype):
    conv = _in_place_conv().to(dtype)
    packs = packing.onednn_runs(dtype, "cpu")
    weight, plain = conv.weight, conv.weight.detach().clone()
    x = torch.randn(2, 8, 6, 6, dtype=dtype)
    want = F.conv2d(x, plain, conv.bias, padding=1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        got = conv(x)
        assert conv.weight is weight and weight.is_mkldnn == packs and "_packed" not in conv.__dict__  # no copy
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        other = torch.randn(1, 8, 10, 10, dtype=dtype)  # another input shape: packed again for it
        torch.testing.assert_close(conv(other), F.conv2d(other, plain, conv.bias, padding=1), atol=tol, rtol=tol)
        assert torch.equal(conv(x), got)
    assert packing.packed_weight_bytes(conv) == packing.kept_packed_bytes(conv) == 0
    state = conv.state_dict()["weight"]
    assert not state.is_mkldnn and torch.equal(state, plain) and weight.is_mkldnn == packs  # saving leaves it packed
    conv.unpack_in_place()
    assert conv.weight is weight and not weight.is_mkldnn and weight.requires_grad and torch.equal(weight, plain)


def test_in_place_packed_weight_trains_again_as_the_same_parameter():
    conv = _in_place_conv()
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1)
    x = torch.randn(1, 8, 5, 5)
    conv(x).sum().backward()
    grad = conv.weight.grad.clone()
    with torch.no_grad():
        conv(x)  # an inference call between backward and step (a preview, say) packs the weight
    assert conv.weight.is_mkldnn and conv.weight.grad is None
    conv(x).sum().backward()  # autograd: the plain weight, its gradient and requires_grad come back first
    assert not conv.weight.is_mkldnn and conv.weight.requires_grad
    torch.testing.assert_close(conv.weight.grad, 2 * grad)
    before = conv.weight.detach().clone()
    optimizer.step()  # the optimizer's parameter is still the module's
    torch.testing.assert_close(conv.weight.detach(), before - 0.1 * 2 * grad)


def test_in_place_packed_weight_comes_back_for_every_other_use(tmp_path):
    import copy

    x = torch.randn(1, 8, 5, 5)
    reference = _conv(8, 16, 3, padding=1)
    uses = {
        "autocast": lambda c: torch.autocast("cpu", torch.bfloat16)(c)(x),
        "float16": lambda c: c.half()(x.half()),
        "to": lambda c: c.to(torch.float64),
        "load_state_dict": lambda c: c.load_state_dict(_conv(8, 16, 3, seed=1, padding=1).state_dict()),
        "unpacked": lambda c: packing.set_weight_packing(c, True),
    }
    for name, use in uses.items():
        conv = _in_place_conv()
        with torch.no_grad():
            conv(x)
            assert conv.weight.is_mkldnn
            use(conv)
        assert not conv.weight.is_mkldnn, name
    conv = _in_place_conv()
    with torch.no_grad():
        want = conv(x)
        for clone in (copy.deepcopy(conv), torch.load(_saved(conv, tmp_path), weights_only=False)):
            assert not clone.weight.is_mkldnn and clone.weight.requires_grad and conv.weight.is_mkldnn
            assert torch.equal(clone.weight, reference.weight) and torch.equal(clone(x), want)
        conv.weight.grad = None
        up = layers.Upsample2D(8)
        packing.set_weight_packing(up, True, in_place=True)
        layers.set_upsample_fusion(up, False)
        up(x)  # unfused: the 3x3 conv is packed in place
        assert up.conv.weight.is_mkldnn
        layers.set_upsample_fusion(up, True)
        up(x)  # the fused kernel is built from the plain weight
        assert not up.conv.weight.is_mkldnn


def _saved(module, tmp_path):
    path = tmp_path / "module.pt"
    torch.save(module, path)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_conv_backend_names_the_kernel_that_runs(dtype):
    """The VRAM planner sizes a convolution's workspace by ``conv_backend``: packed where oneDNN runs the dtype here,
    else the kernel PyTorch's own convolution selects on this CPU (oneDNN, or im2col where oneDNN has no kernel)."""
    conv = _conv(16, 16, 3, padding=1).to(dtype)
    x = torch.randn(2, 16, 32, 32, dtype=dtype)
    own = torch._C._select_conv_backend(x, conv.weight, conv.bias, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, None)
    unpacked = {"Mkldnn": "onednn", "Slow2d": "unfold"}[own.name]
    assert packing.conv_backend(conv) == ("packed" if packing.onednn_runs(dtype, "cpu") else unpacked)
    packing.set_weight_packing(conv, False)
    assert packing.conv_backend(conv) == unpacked
    assert packing.conv_backend(conv.to("meta")) == "device" and packing.conv_backend(torch.nn.ReLU()) == "packed"


def test_set_weight_packing_rejects_in_place_without_packing():
    with pytest.raises(ValueError, match="in_place=True packs weights: it needs enabled=True"):
        packing.set_weight_packing(_conv(2, 2, 1), False, in_place=True)
    with pytest.raises(ValueError, match="in_place=1 must be True or False"):
        packing.set_weight_packing(_conv(2, 2, 1), True, in_place=1)


@pytest.mark.parametrize(
    "shape, other",
    [((2, 3, 4, 4), (2, 3, 1, 1)), ((2, 3, 4, 4), (3, 1, 1)), ((2, 3, 4, 4), ()), ((1, 3, 4, 4), (2, 3, 4, 4)),
     ((2, 3, 1, 4), (2, 3, 4, 4)), ((3, 4), (2, 3, 4)), ((2, 3, 4, 4), (2, 3, 4, 4))],
)  # fmt: skip
def test_residual_add_writes_in_place_only_where_the_sum_keeps_the_shape(shape, other):
    h, o = torch.randn(shape), torch.randn(other)
    expected = h + o
    out = layers._add(h.clone(), o, inplace=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    keeps = torch.broadcast_shapes(shape, other) == torch.Size(shape)
    assert layers._broadcasts_into(torch.Size(other), torch.Size(shape)) == keeps
