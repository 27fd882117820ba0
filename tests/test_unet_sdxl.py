"""SDXL U-Nets: parity with diffusers on tiny random base- and refiner-shaped networks (text_time conditioning,
per-block and per-layer transformer depths), errors for missing or mis-shaped added conditions, the translation of
the full-size SDXL base and refiner configs (built on the meta device), and the memory estimate of deep stacks."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from unnoise.models import load_diffusers, packing
from unnoise.models.unet import UNet, UNetConfig

ATOL = 1e-4
TEXT_WIDTH = {"base": 20, "refiner": 16, "asymmetric": 20}  # the pooled text embedding (1280 for OpenCLIP bigG)

# SDXL base in small: no attention in the first block, deeper transformers further down (SDXL: [1, 2, 10]), heads
# from attention_head_dim, linear projections, six time ids of addition_time_embed_dim each after the text embedding.
BASE = dict(
    block_out_channels=(16, 32, 48),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 3),
    attention_head_dim=(2, 4, 6),
    cross_attention_dim=24,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=TEXT_WIDTH["base"] + 6 * 8,
    norm_num_groups=8,
)
# The refiner in small: four levels, attention only in the middle two and the mid block (whose level has none
# otherwise), one depth for all, five time ids (the last the aesthetic score).
REFINER = dict(
    block_out_channels=(16, 24, 32, 32),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=2,
    attention_head_dim=(2, 3, 4, 4),
    cross_attention_dim=20,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=6,
    projection_class_embeddings_input_dim=TEXT_WIDTH["refiner"] + 5 * 6,
    norm_num_groups=8,
)
# Per-layer depths with separate up-block depths (SSD-1B-style distilled SDXL), a depth of 0 included; the mid block
# takes the last down block's first depth (2).
ASYMMETRIC = dict(
    BASE,
    transformer_layers_per_block=(1, (1, 2), (2, 0)),
    reverse_transformer_layers_per_block=((0, 1, 3), (2, 1, 1), 1),
    use_linear_projection=False,
)
CASES = {"base": BASE, "refiner": REFINER, "asymmetric": ASYMMETRIC}
TIME_IDS = {  # (original h, w, crop top, left, target h, w) / (original h, w, crop top, left, aesthetic score)
    "base": [[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0], [512.0, 896.0, 32.0, 0.0, 768.0, 1344.0]],
    "refiner": [[1024.0, 768.0, 0.0, 16.0, 6.0], [512.0, 512.0, 4.0, 0.0, 2.5]],
}
SIZES = {"base": [(16, 16), (12, 20)], "refiner": [(16, 16), (24, 8)], "asymmetric": [(16, 16), (12, 20)]}


def diffusers_kwargs(kwargs):
    """A case with its tuples as lists, as diffusers' config.json holds them (nested depths included)."""

    def lists(value):
        return [lists(v) for v in value] if isinstance(value, tuple) else value

    return {k: lists(v) for k, v in kwargs.items()}


def our_config(case, **change):
    """Our config of ``case`` built directly (heads under their own name), with ``change`` applied."""
    fields = {**CASES[case], **change}
    return UNetConfig(in_channels=4, out_channels=4, num_attention_heads=fields.pop("attention_head_dim"), **fields)


def randomized(kwargs):
    """A diffusers model with every parameter random, so that zero-initialized output layers hide nothing."""
    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=16, **diffusers_kwargs(kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.15)
    return model


def conditions(case, batch=2, size=(16, 16)):
    """x and every condition of ``case``: encoder_hidden_states, text_embeds, time_ids."""
    g = torch.Generator().manual_seed(1)
    config = CASES[case]
    x = torch.randn(batch, 4, *size, generator=g)
    ids = TIME_IDS["refiner" if case == "refiner" else "base"]
    return x, {
        "encoder_hidden_states": torch.randn(batch, 5, config["cross_attention_dim"], generator=g),
        "text_embeds": torch.randn(batch, TEXT_WIDTH[case], generator=g),
        "time_ids": torch.tensor(ids)[:batch],
    }


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
    """(case, diffusers model, our model loaded from its folder)."""
    reference = randomized(CASES[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder)
    return request.param, reference, load_diffusers(folder).eval()


@torch.no_grad()
def test_parity_with_diffusers(saved):
    case, reference, ours = saved
    assert ours.state_dict().keys() == reference.state_dict().keys()
    worst = 0.0
    for size in SIZES[case]:
        x, cond = conditions(case, size=size)
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        for t in (torch.tensor([10.5, 731.25]), 999):
            expected = reference(x, t, cond["encoder_hidden_states"], added_cond_kwargs=added).sample
            out = ours(x, t, **cond)
            assert torch.equal(ours(x, t, cond["encoder_hidden_states"], added_cond_kwargs=added), out)
            worst = max(worst, (out - expected).abs().max().item())
    print(f"{case}: max abs error {worst:.2e} (outputs of scale {expected.abs().max():.1f})")
    assert worst < ATOL


@torch.no_grad()
def test_time_ids_and_text_embeds_change_the_output(saved):
    case, _, ours = saved
    x, cond = conditions(case)
    out = ours(x, 50, **cond)
    for name in ("time_ids", "text_embeds"):
        changed = dict(cond, **{name: cond[name] + 1})
        assert not torch.allclose(ours(x, 50, **changed), out, atol=1e-3), name


def test_per_layer_depths_build_like_diffusers():
    """The depth of every transformer, down, mid and up, as diffusers builds it (up blocks: the reverse depths)."""
    config = UNetConfig.from_diffusers({"_class_name": "UNet2DConditionModel", **diffusers_kwargs(ASYMMETRIC)})
    assert config.transformer_depths("down", 2) == (2, 0) and config.transformer_depths("mid") == (2,)
    assert config.transformer_depths("up", 0) == (0, 1, 3) and config.transformer_depths("up", 2) == (1, 1, 1)
    with torch.device("meta"):
        ours, theirs = UNet(config), UNet2DConditionModel(**diffusers_kwargs(ASYMMETRIC))

    def depths(model):
        return {
            name: len(m.transformer_blocks) for name, m in model.named_modules() if hasattr(m, "transformer_blocks")
        }

    assert depths(ours) == depths(theirs)
    assert list(depths(ours).values()) == [1, 2, 2, 0, 2, 0, 1, 3, 2, 1, 1]  # down, mid, up


@pytest.mark.parametrize(
    ("case", "change", "match"),
    [
        ("base", dict(text_embeds=None), r"text_embeds has shape None; expected \(2, width\)"),
        ("base", dict(time_ids=None), r"time_ids has shape None; expected \(2, 6\)"),
        ("base", dict(time_ids=torch.zeros(2, 5)), r"time_ids has shape \(2, 5\); expected \(2, 6\)"),
        ("base", dict(time_ids=torch.zeros(12)), r"time_ids has shape \(12,\); expected \(2, 6\)"),
        ("refiner", dict(time_ids=torch.zeros(2, 6)), r"time_ids has shape \(2, 6\); expected \(2, 5\)"),
        ("base", dict(text_embeds=torch.zeros(1, 20)), r"text_embeds has shape \(1, 20\); expected \(2, width\)"),
        ("base", dict(text_embeds=torch.zeros(2, 21)), r"text_embeds has shape \(2, 21\).*8 \(addition_time_emb"),
        ("base", dict(added_cond_kwargs={"time_ids": torch.zeros(2, 6)}), "not both"),
        ("base", dict(added_cond_kwargs={"image_embeds": torch.zeros(2, 6)}), r"added_cond_kwargs has keys \['ima"),
    ],
)
def test_bad_added_conditions_name_argument_and_shape(case, change, match):
    unet = UNet(our_config(case))
    x, cond = conditions(case)
    with pytest.raises(ValueError, match=match):
        unet(x, 1, **{**cond, **change})


def test_models_without_added_embedding_refuse_them():
    off = dict(addition_embed_type=None, addition_time_embed_dim=None, projection_class_embeddings_input_dim=None)
    unet = UNet(our_config("base", **off))
    x, cond = conditions("base")
    for name in ("text_embeds", "time_ids"):
        with pytest.raises(ValueError, match=f"{name} has shape .*expected None: .*addition_embed_type=None"):
            unet(x, 1, cond["encoder_hidden_states"], **{name: cond[name]})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(addition_embed_type="text_image"), "addition_embed_type='text_image'"),
        (dict(addition_time_embed_dim=None), "addition_time_embed_dim=None: addition_embed_type='text_time' needs"),
        (dict(projection_class_embeddings_input_dim=0), "projection_class_embeddings_input_dim=0"),
        (dict(addition_embed_type=None), "addition_time_embed_dim=8: must be None without"),
        (dict(transformer_layers_per_block=(1, 2)), "transformer_layers_per_block"),
        (dict(transformer_layers_per_block=(1, 2, -1)), "transformer_layers_per_block.*depth >= 0"),
        (dict(transformer_layers_per_block=(1, (2, 2, 2), 3)), r"transformer_layers_per_block.*layers: \(2, 2, 2\)"),
        (dict(transformer_layers_per_block=(1, (2, 2), 3)), "reverse_transformer_layers_per_block=None: needed"),
        (dict(reverse_transformer_layers_per_block=(1, 2)), "reverse_transformer_layers_per_block.*3 entries"),
        (dict(reverse_transformer_layers_per_block=(1, (2, 2), 3)), r"reverse.*layers: \(3, 3, 3\)"),
    ],
)
def test_config_errors_name_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        our_config("base", **change)


def sdxl_config(model):
    """The U-Net config.json of SDXL 1.0 base / refiner (stabilityai/stable-diffusion-xl-*-1.0, as published)."""
    common = dict(
        _class_name="UNet2DConditionModel",
        _diffusers_version="0.19.0.dev0",
        act_fn="silu",
        addition_embed_type="text_time",
        addition_embed_type_num_heads=64,
        addition_time_embed_dim=256,
        center_input_sample=False,
        class_embed_type=None,
        class_embeddings_concat=False,
        conv_in_kernel=3,
        conv_out_kernel=3,
        cross_attention_norm=None,
        downsample_padding=1,
        dual_cross_attention=False,
        encoder_hid_dim=None,
        encoder_hid_dim_type=None,
        flip_sin_to_cos=True,
        freq_shift=0,
        in_channels=4,
        layers_per_block=2,
        mid_block_only_cross_attention=None,
        mid_block_scale_factor=1,
        mid_block_type="UNetMidBlock2DCrossAttn",
        norm_eps=1e-05,
        norm_num_groups=32,
        num_attention_heads=None,
        num_class_embeds=None,
        only_cross_attention=False,
        out_channels=4,
        resnet_out_scale_factor=1.0,
        resnet_skip_time_act=False,
        resnet_time_scale_shift="default",
        sample_size=128,
        time_cond_proj_dim=None,
        time_embedding_act_fn=None,
        time_embedding_dim=None,
        time_embedding_type="positional",
        timestep_post_act=None,
        upcast_attention=None,
        use_linear_projection=True,
    )
    if model == "base":
        return dict(
            common,
            attention_head_dim=[5, 10, 20],
            block_out_channels=[320, 640, 1280],
            cross_attention_dim=2048,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            projection_class_embeddings_input_dim=2816,
            transformer_layers_per_block=[1, 2, 10],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        )
    return dict(
        common,
        attention_head_dim=[6, 12, 24, 24],
        block_out_channels=[384, 768, 1536, 1536],
        cross_attention_dim=1280,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        projection_class_embeddings_input_dim=2560,
        transformer_layers_per_block=4,
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    )


# Parameters of the published U-Nets (diffusers' count of the full-size models).
SDXL_PARAMETERS = {"base": 2_567_463_684, "refiner": 2_259_526_660}


@pytest.mark.parametrize("model", ["base", "refiner"])
def test_full_size_sdxl_layout(model, tmp_path):
    """Full-size SDXL configs give diffusers' keys, shapes and parameter count (built on the meta device)."""
    cfg = sdxl_config(model)
    config = UNetConfig.from_diffusers(cfg)
    heads = {"base": {1: (10, 64), 2: (20, 64)}, "refiner": {1: (12, 64), 2: (24, 64), 3: (24, 64)}}[model]
    assert {level: config.attention_shape(level) for level in config.attention_levels()} == heads
    assert config.cross_attention_dim == (2048 if model == "base" else 1280) and config.use_linear_projection
    assert config.transformer_depths("mid") == ((10,) if model == "base" else (4,))
    with torch.device("meta"):
        ours = UNet(config)
        theirs = UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) == SDXL_PARAMETERS[model]
    config.save(tmp_path / "config.json")
    assert UNetConfig.load(tmp_path / "config.json") == config


def test_nested_depths_round_trip_through_json(tmp_path):
    config = our_config("asymmetric")
    config.save(tmp_path / "config.json")
    assert UNetConfig.load(tmp_path / "config.json") == config
    assert config.transformer_layers_per_block == (1, (1, 2), (2, 0))


@pytest.mark.parametrize(
    "option",
    [
        {"addition_embed_type": "image"},
        {"class_embed_type": "projection"},
        {"encoder_hid_dim": 1280, "encoder_hid_dim_type": "text_proj"},
    ],
)
def test_sdxl_with_unsupported_options_is_refused(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        UNetConfig.from_diffusers({**sdxl_config("base"), **option})


@torch.no_grad()
def test_activation_estimate_bounds_deep_stacks():
    """The planner's estimate bounds the profiled peak of an SDXL-shaped network with deep transformer stacks, and
    does not grow with depth: without autograd each transformer block replaces the tokens of the one before."""
    from unnoise.serve.vram import measured_activations

    peaks, estimates = [], []
    for depths in ((1, 1, 1), (1, 3, 6)):
        torch.manual_seed(0)
        unet = UNet(our_config("base", block_out_channels=(32, 64, 96), transformer_layers_per_block=depths))
        packing.prepare_for_inference(unet.eval())
        x, cond = conditions("base", batch=2, size=(64, 64))
        cond["encoder_hidden_states"] = torch.randn(2, 77, 24)
        unet(x, 500, **cond)  # warm up: the weights packed in place
        peaks.append(measured_activations(lambda unet=unet, x=x, cond=cond: unet(x, 500, **cond), "cpu"))
        estimates.append(unet.activation_bytes(2, 64, 64, 77))
        print(f"depths {depths}: estimate {estimates[-1] / 2**20:.1f} MiB, profiled {peaks[-1] / 2**20:.1f} MiB")
    assert estimates[0] == estimates[1] and peaks[1] <= 1.05 * peaks[0]
    assert all(peak <= estimate <= 2 * peak for peak, estimate in zip(peaks, estimates))
