"""U-Net: parity with diffusers on random weights (max abs error 1e-4, fp32), our format, memory options, errors."""

import copy
import json
import time

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from safetensors.torch import load_file, save_file

from unnoise.models import layers, load_diffusers, load_model, packing, save_model
from unnoise.models.unet import UNet, UNetConfig

ATOL = 1e-4

# Small diffusers configs: (a) pixel-space with self-attention and class labels, also with scale-shift time
# conditioning (whose mid attention has no GroupNorm in diffusers); (b) SD 1.x style: conv projection,
# attention_head_dim = number of heads; (c) SD 2.x style: linear projection, per-block head counts.
CASES = {
    "pixel": (
        UNet2DModel,
        dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
            attention_head_dim=16,
            num_class_embeds=10,
        ),
    ),
    "pixel_scale_shift": (
        UNet2DModel,
        dict(
            block_out_channels=(16, 32, 32),
            layers_per_block=2,
            down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
            norm_num_groups=8,
            attention_head_dim=None,
            resnet_time_scale_shift="scale_shift",
            num_class_embeds=3,
            downsample_padding=0,
            freq_shift=1,
            flip_sin_to_cos=False,
            mid_block_scale_factor=1.5,
        ),
    ),
    "sd1": (
        UNet2DConditionModel,
        dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=24,
            attention_head_dim=4,
            norm_num_groups=8,
        ),
    ),
    "sd2": (
        UNet2DConditionModel,
        dict(
            block_out_channels=(16, 32, 48),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=24,
            attention_head_dim=[2, 4, 6],
            use_linear_projection=True,
            transformer_layers_per_block=2,
            upcast_attention=True,
            norm_num_groups=8,
        ),
    ),
}
TIMESTEPS = [torch.tensor([10.5, 731.25]), 500, 999.0, torch.tensor(250)]


def randomized(cls, kwargs):
    """A diffusers model with every parameter random, so that zero-initialized output layers hide nothing."""
    torch.manual_seed(0)
    model = cls(sample_size=16, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.15)
    return model


def inputs(config, batch=2):
    """x and conditioning for a diffusers or our config (same field names)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.in_channels, 16, 16, generator=g)
    cond = {}
    if "CrossAttnDownBlock2D" in config.down_block_types:
        cond["encoder_hidden_states"] = torch.randn(batch, 5, config.cross_attention_dim, generator=g)
    if config.num_class_embeds:
        cond["class_labels"] = torch.arange(batch) % config.num_class_embeds
    return x, cond


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
    """(diffusers model, its folder) for each case."""
    model = randomized(*CASES[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return model, folder


@torch.no_grad()
def test_parity_with_diffusers(saved):
    reference, folder = saved
    ours = load_diffusers(folder).eval()
    assert isinstance(ours, UNet)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    x, cond = inputs(reference.config)
    for t in TIMESTEPS:
        expected = reference(x, t, **cond).sample
        assert (ours(x, t, **cond) - expected).abs().max() < ATOL, f"t={t}"


@torch.no_grad()
def test_fp16_variant_loads(tmp_path):
    reference = randomized(*CASES["sd1"]).half()
    reference.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").exists()
    reference.float()
    x, cond = inputs(reference.config)
    expected = reference(x, 300.5, **cond).sample
    for model in (load_diffusers(tmp_path, variant="fp16"), load_diffusers(tmp_path)):  # the second: fallback
        assert (model.eval()(x, 300.5, **cond) - expected).abs().max() < ATOL
    assert load_diffusers(tmp_path, variant="fp16", dtype=torch.float16).conv_in.weight.dtype == torch.float16


@torch.no_grad()
def test_pickle_needs_consent(tmp_path):
    reference = randomized(*CASES["pixel"])
    reference.save_pretrained(tmp_path, safe_serialization=False)
    assert [p.name for p in tmp_path.glob("diffusion_pytorch_model*")] == ["diffusion_pytorch_model.bin"]
    with pytest.raises(ValueError, match="pickle"):
        load_diffusers(tmp_path)
    x, cond = inputs(reference.config)
    out = load_diffusers(tmp_path, allow_pickle=True).eval()(x, 20, **cond)
    assert (out - reference(x, 20, **cond).sample).abs().max() < ATOL


@pytest.mark.parametrize("tamper", ["missing", "unexpected", "shape"])
def test_tampered_weights_name_the_key(tmp_path, tamper):
    randomized(*CASES["pixel"]).save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    key = "down_blocks.1.attentions.0.to_q.weight"
    if tamper == "missing":
        del state[key]
    elif tamper == "unexpected":
        key = "down_blocks.1.attentions.0.extra.weight"
        state[key] = torch.zeros(1)
    else:
        state[key] = state[key][:, :-1].contiguous()
    save_file(state, str(path))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_diffusers(tmp_path)


def sd_config(version):
    """The U-Net config.json of Stable Diffusion 1.5 / 2.1 (as published, keys the old files leave out omitted)."""
    blocks = dict(
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        block_out_channels=[320, 640, 1280, 1280],
    )
    common = dict(_class_name="UNet2DConditionModel", _diffusers_version="0.10.0", act_fn="silu", **blocks)
    common.update(center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4)
    common.update(layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, out_channels=4)
    if version == 1:
        return dict(common, attention_head_dim=8, cross_attention_dim=768, sample_size=64)
    sd2 = dict(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, sample_size=96, upcast_attention=True)
    return dict(common, **sd2, use_linear_projection=True, dual_cross_attention=False, num_class_embeds=None)


@pytest.mark.parametrize("version", [1, 2])
def test_full_size_stable_diffusion_layout(version):
    """Full-size SD 1.5 / 2.1 configs give diffusers' keys and shapes (built on the meta device: no memory)."""
    cfg = sd_config(version)
    config = UNetConfig.from_diffusers(cfg)
    expected_heads = [(8, 40), (8, 80), (8, 160), (8, 160)] if version == 1 else [(5, 64), (10, 64), (20, 64), (20, 64)]
    assert [config.attention_shape(level) for level in range(4)] == expected_heads
    with torch.device("meta"):
        ours = UNet(config).state_dict()
        theirs = UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize(
    "option",
    [
        {"addition_embed_type": "text_time"},
        {"encoder_hid_dim": 32, "encoder_hid_dim_type": "text_proj"},
        {"class_embed_type": "timestep"},
        {"time_embedding_type": "fourier"},
        {"only_cross_attention": [True, False, False, False]},
        {"attention_type": "gated"},
        {"conv_in_kernel": 5},
        {"some_future_option": 1},
    ],
)
def test_from_diffusers_refuses_unsupported_options(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        UNetConfig.from_diffusers({**sd_config(1), **option})


def test_from_diffusers_refuses_other_classes_and_blocks():
    with pytest.raises(ValueError, match="_class_name"):
        UNetConfig.from_diffusers({**sd_config(1), "_class_name": "UNet3DConditionModel"})
    with pytest.raises(ValueError, match="mid_block_type"):
        UNetConfig.from_diffusers({**sd_config(1), "mid_block_type": "UNetMidBlock2DSimpleCrossAttn"})
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        UNetConfig.from_diffusers({**sd_config(1), "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4})


# Our own config mixing every block kind: self-attention, cross-attention, class labels.
MIXED = UNetConfig(
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("AttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "AttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    num_attention_heads=2,
    cross_attention_dim=12,
    norm_num_groups=8,
    num_class_embeds=4,
)


def mixed_model():
    torch.manual_seed(0)
    model = UNet(MIXED).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.15)
    return model


def test_config_json_round_trip(tmp_path):
    for config in (MIXED, UNetConfig(), UNetConfig.from_diffusers(sd_config(2))):
        config.save(tmp_path / "config.json")
        assert UNetConfig.load(tmp_path / "config.json") == config
    from_lists = UNetConfig(
        block_out_channels=[32, 64], down_block_types=["DownBlock2D"] * 2, up_block_types=["UpBlock2D"] * 2
    )
    assert from_lists.block_out_channels == (32, 64) and from_lists.down_block_types == ("DownBlock2D",) * 2
    with pytest.raises(ValueError, match="bogus"):
        UNetConfig.from_dict({**MIXED.to_dict(), "bogus": 1})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(block_out_channels=(16, 32, 64)), "down_block_types"),
        (dict(down_block_types=("DownBlock2D", "FancyBlock")), "FancyBlock"),
        (dict(mid_block_type="UNetMidBlockFancy"), "mid_block_type"),
        (dict(block_out_channels=(12, 32)), "norm_num_groups"),
        (dict(cross_attention_dim=None), "cross_attention_dim"),
        (dict(num_attention_heads=(2, 2, 2)), "num_attention_heads"),
        (dict(num_attention_heads=64), "num_attention_heads"),
        (dict(resnet_time_scale_shift="spatial"), "resnet_time_scale_shift"),
        (dict(layers_per_block=0), "layers_per_block"),
        (dict(norm_num_groups=None), "norm_num_groups"),
    ],
)
def test_config_errors_name_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig.from_dict({**MIXED.to_dict(), **change})


@torch.no_grad()
def test_our_format_round_trip(tmp_path):
    model = mixed_model()
    save_model(model, tmp_path)
    loaded = load_model(tmp_path).eval()
    assert loaded.config == MIXED
    x, cond = inputs(MIXED)
    assert torch.equal(loaded(x, 7.5, **cond), model(x, 7.5, **cond))


@torch.no_grad()
def test_timestep_forms_agree():
    model = mixed_model()
    x, cond = inputs(MIXED)
    expected = model(x, torch.tensor([42, 42]), **cond)
    for t in (42, 42.0, torch.tensor(42), torch.tensor([42.0])):
        assert torch.allclose(model(x, t, **cond), expected, atol=1e-6)
    assert not torch.allclose(model(x, torch.tensor([42.0, 42.5]), **cond), expected)


@torch.no_grad()
def test_chunked_attention_matches_sdpa():
    model = mixed_model()
    x, cond = inputs(MIXED)
    expected = model(x, 3, **cond)
    assert torch.allclose(model.set_attention_mode("chunked", chunk_size=5)(x, 3, **cond), expected, atol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        model.set_attention_mode("flash")


def test_gradient_checkpointing_same_outputs_and_gradients():
    model = mixed_model().train()
    x, cond = inputs(MIXED)
    results = []
    for enabled in (False, True):
        model.enable_gradient_checkpointing(enabled).zero_grad()
        out = model(x, 3.5, **cond)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (out_plain, grads_plain), (out_ckpt, grads_ckpt) = results
    assert torch.allclose(out_plain, out_ckpt, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_plain, grads_ckpt))


@torch.no_grad()
def test_packed_weights_match_pytorch_kernels_and_keep_the_input_layout():
    """CPU inference runs oneDNN on reordered weights (channels-last inside); the output has the input's layout."""
    model = mixed_model()
    x, cond = inputs(MIXED)
    packed = model(x, 3, **cond)
    assert packing.packed_weight_bytes(model) > 0 and packed.is_contiguous()
    plain = copy.deepcopy(model)
    packing.set_weight_packing(plain, False)
    torch.testing.assert_close(packed, plain(x, 3, **cond), atol=1e-5, rtol=0)
    last = model(x.to(memory_format=torch.channels_last), 3, **cond)
    assert last.is_contiguous(memory_format=torch.channels_last) and not last.is_contiguous()
    torch.testing.assert_close(last, packed, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_weights_packed_in_place_match_and_keep_no_copy(fused):
    """``set_weight_packing(model, True, in_place=True)``: the same outputs with nothing kept beside the weights but
    fused upsamplers' packed phase kernels (not their plain ones); the state dict still holds the plain weights."""
    model = mixed_model()
    layers.set_upsample_fusion(model, fused)
    plain_state = copy.deepcopy(model.state_dict())
    x, cond = inputs(MIXED)
    with torch.no_grad():
        want = model(x, 3, **cond)
        packing.set_weight_packing(model, True, in_place=True)
        got = model(x, 3, **cond)
        again = model(x, 3, **cond)
    assert any(m.weight.is_mkldnn for m in model.modules() if isinstance(m, packing.Conv2d))
    upsamplers = [m for m in model.modules() if isinstance(m, layers.Upsample2D) and m.conv is not None]
    phase_kernels = sum(m.phase_kernel_bytes() for m in upsamplers) if fused else 0
    assert packing.packed_weight_bytes(model) == packing.kept_packed_bytes(model) == phase_kernels
    assert upsamplers and all(m._cache is None and m.fused_weight_bytes() == 0 for m in upsamplers)  # packed only
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.equal(again, got)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in plain_state.items())


def test_prepare_for_inference_packs_in_place_and_unfuses_upsampling_on_the_cpu():
    """The Pipeline's defaults for a U-Net: conv weights packed in place, matrix products through PyTorch and, on the
    CPU, unfused upsampling (fused on other devices); the same outputs, nothing kept beside the weights, plain weights
    saved; harmless to repeat."""
    model = mixed_model()
    x, cond = inputs(MIXED)
    with torch.no_grad():
        want = model(x, 3, **cond)
        packing.prepare_for_inference(model)
        packing.prepare_for_inference(model)
        got = model(x, 3, **cond)
    upsamplers = [m for m in model.modules() if isinstance(m, layers.Upsample2D)]
    convs = [m for m in model.modules() if isinstance(m, packing.Conv2d)]
    assert upsamplers and not any(m.fused for m in upsamplers)
    assert all(c.pack_in_place for c in convs) and any(c.weight.is_mkldnn for c in convs)
    assert not any(m.packed for m in model.modules() if isinstance(m, (packing.Linear, packing.TokenConv2d)))
    assert packing.kept_packed_bytes(model) == packing.packed_weight_bytes(model) == 0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in mixed_model().state_dict().items())
    packing.prepare_for_inference(model.to("meta"))
    assert all(m.fused for m in upsamplers)


@torch.no_grad()
def test_channels_last_matches():
    model = mixed_model()
    x, cond = inputs(MIXED)
    expected = model(x, 3, **cond)
    model = model.to(memory_format=torch.channels_last)
    assert torch.allclose(model(x.to(memory_format=torch.channels_last), 3, **cond), expected, atol=1e-5)


@torch.no_grad()
def test_bf16_weights_close_to_fp32():
    """bf16 weights (GroupNorm in fp32): output within 3% of the output's scale; input and output stay fp32."""
    model = mixed_model()
    x, cond = inputs(MIXED)
    expected = model(x, 3, **cond)
    out = model.to(torch.bfloat16)(x, 3, **cond)
    assert out.dtype == torch.float32
    assert (out - expected).abs().max() < 0.03 * expected.abs().max()


@torch.no_grad()
def test_compile_matches():
    model = mixed_model()
    x, cond = inputs(MIXED)
    expected = model(x, 3, **cond)
    compiled = copy.deepcopy(model).compile(backend="aot_eager", dynamic=False)
    assert torch.allclose(compiled(x, 3, **cond), expected, atol=1e-5)
    packing.set_weight_packing(model, True, in_place=True)
    model(x, 3, **cond)  # packs the conv weights in place, which torch.compile cannot trace: compile unpacks them
    model.compile(backend="aot_eager", dynamic=False)
    assert torch.allclose(model(x, 3, **cond), expected, atol=1e-5)
    assert not any(m.weight.is_mkldnn or m.pack_in_place for m in model.modules() if isinstance(m, packing.Conv2d))


@pytest.mark.slow
@torch.no_grad()
def test_compile_inductor_matches():
    model = mixed_model()
    x, cond = inputs(MIXED)
    start = time.perf_counter()
    assert torch.allclose(copy.deepcopy(model).compile()(x, 3, **cond), model(x, 3, **cond), atol=1e-4)
    print(f"inductor compile + first call: {time.perf_counter() - start:.1f} s")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(x=torch.randn(2, 3, 16, 16)), r"x has shape \(2, 3, 16, 16\).*\(batch, 4"),
        (dict(x=torch.randn(2, 4, 16, 9)), r"spatial size \(16, 9\).*multiples of 2"),
        (dict(encoder_hidden_states=None), r"encoder_hidden_states has shape None.*\(2, tokens, 12\)"),
        (dict(encoder_hidden_states=torch.randn(2, 5, 7)), r"encoder_hidden_states has shape \(2, 5, 7\)"),
        (dict(class_labels=None), r"class_labels has shape None.*\(2,\)"),
        (dict(class_labels=torch.zeros(3, dtype=torch.long)), r"class_labels has shape \(3,\)"),
        (dict(class_labels=torch.zeros(2)), r"class_labels has dtype torch.float32; expected integer"),
        (dict(t=torch.ones(3)), r"t has shape \(3,\).*\(2,\)"),
    ],
)
def test_bad_inputs_name_argument_and_shape(change, match):
    model = mixed_model()
    x, cond = inputs(MIXED)
    args = {"x": x, "t": 1, **cond, **change}
    with pytest.raises(ValueError, match=match):
        model(**args)


def test_unconditional_model_refuses_conditioning():
    config = UNetConfig(
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        layers_per_block=1,
    )
    model = UNet(config)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="encoder_hidden_states.*no cross-attention"):
        model(x, 1, encoder_hidden_states=torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="class_labels.*no class embedding"):
        model(x, 1, class_labels=torch.zeros(1, dtype=torch.long))


def test_default_config_is_valid_json():
    assert json.loads(json.dumps(UNetConfig().to_dict()))["block_out_channels"] == [64, 128, 256, 256]
