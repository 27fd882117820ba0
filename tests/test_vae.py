"""KL autoencoder: parity with diffusers' AutoencoderKL, tiling without seams, memory options, formats, errors."""

import copy
import json
import math

import diffusers
import pytest
import torch
import torch.nn.functional as F
from helpers import randomize
from safetensors.torch import load_file, save_file

from unnoise.models import load_diffusers, load_model, save_model
from unnoise.models.layers import Upsample2D, set_attention_mode
from unnoise.models.packing import Conv2d, packed_weight_bytes, prepare_for_inference, set_weight_packing
from unnoise.models.vae import AutoencoderKL, AutoencoderKLConfig, _tile_starts, _tiled

PARITY_ATOL = 1e-4  # fp32 acceptance bound against diffusers
SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=32)
BLOCKS = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def smooth_field(batch: int, channels: int, size: int, knots: int, seed: int) -> torch.Tensor:
    """Low-frequency random fields: Gaussian values on a ``knots`` x ``knots`` grid, bicubically interpolated."""
    return F.interpolate(randn(batch, channels, knots, knots, seed=seed), size=(size, size), mode="bicubic")


def assert_equal_to_rounding(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Equal up to float32 rounding: max abs difference <= ``tol`` times the largest magnitude of ``expected``.

    The batch size changes which conv kernels PyTorch picks on CPU, so batched and per-image results differ in the
    last bits (about 1e-6 relative after ~20 layers; the first conv alone already differs by ~1e-7 relative).
    """
    assert (actual - expected).abs().max() <= tol * expected.abs().max()


def generators(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + i) for i in range(n)]


# -- parity with diffusers -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sd", "no_quant_no_mid_attention"])
def reference(request, tmp_path_factory):
    """A random diffusers AutoencoderKL saved with save_pretrained, and ours loaded from that folder."""
    extra = {} if request.param == "sd" else dict(use_quant_conv=False, use_post_quant_conv=False)
    if request.param != "sd":
        extra["mid_block_add_attention"] = False
    theirs = diffusers.AutoencoderKL(**SMALL, **BLOCKS, **extra).eval()
    randomize(theirs, seed=1)
    folder = tmp_path_factory.mktemp(request.param)
    theirs.save_pretrained(folder)
    return theirs, folder


def test_state_dict_keys_match_diffusers(reference):
    theirs, folder = reference
    ours = load_diffusers(folder)
    assert isinstance(ours, AutoencoderKL)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(theirs)


@torch.no_grad()
def test_encode_sample_decode_match_diffusers(reference):
    theirs, folder = reference
    ours = load_diffusers(folder).eval()
    x = randn(2, 3, 32, 32, seed=2)
    expected, posterior = theirs.encode(x).latent_dist, ours.encode(x)
    for name in ("mean", "std", "logvar"):
        torch.testing.assert_close(getattr(posterior, name), getattr(expected, name), atol=PARITY_ATOL, rtol=0)
    torch.testing.assert_close(posterior.kl(), expected.kl(), atol=PARITY_ATOL, rtol=1e-5)
    # diffusers' randn_tensor draws torch.randn(shape) from one generator, or (1, ...) per image from a list: same here.
    g_ours, g_theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(posterior.sample(g_ours), expected.sample(g_theirs), atol=PARITY_ATOL, rtol=0)
    torch.testing.assert_close(
        posterior.sample(generators(2)), expected.sample(generators(2)), atol=PARITY_ATOL, rtol=0
    )
    z = randn(2, 4, 16, 16, seed=3)
    torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=PARITY_ATOL, rtol=0)


@torch.no_grad()
def test_fp16_variant_and_legacy_attention_keys_load(reference, tmp_path):
    theirs, folder = reference
    half = copy.deepcopy(theirs).half()
    half.save_pretrained(tmp_path / "fp16", variant="fp16")
    stored = load_file(str(tmp_path / "fp16" / "diffusion_pytorch_model.fp16.safetensors"))
    assert stored["decoder.conv_in.weight"].dtype == torch.float16
    ours = load_diffusers(tmp_path / "fp16", variant="fp16").eval()
    rounded = copy.deepcopy(half).float()  # the same fp16-rounded weights, run by diffusers in fp32
    z = randn(1, 4, 8, 8, seed=4)
    torch.testing.assert_close(ours.decode(z), rounded.decode(z).sample, atol=PARITY_ATOL, rtol=0)

    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    renamed = {}
    for key, value in state.items():
        for new, old in legacy.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        renamed[key] = value
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "config.json").write_text((folder / "config.json").read_text())
    save_file(renamed, str(tmp_path / "legacy" / "diffusion_pytorch_model.safetensors"))
    if theirs.config.mid_block_add_attention:
        assert any(".attentions.0.query." in k for k in renamed)
    ours = load_diffusers(tmp_path / "legacy").eval()
    torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=PARITY_ATOL, rtol=0)


def test_from_diffusers_rejects_what_it_cannot_build():
    base = dict(_class_name="AutoencoderKL", block_out_channels=[32, 64], **{k: list(v) for k, v in BLOCKS.items()})
    assert AutoencoderKLConfig.from_diffusers(base).block_out_channels == (32, 64)
    assert AutoencoderKLConfig.from_diffusers(base).layers_per_block == 1  # diffusers' default, not SD's 2
    bad = {
        "down_block_types": dict(down_block_types=["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]),
        "up_block_types": dict(up_block_types=["UpDecoderBlock2D"]),
        "act_fn": dict(act_fn="gelu"),
        "latents_mean": dict(latents_mean=[0.0] * 4),
        "sample_size": dict(sample_size=[32, 32]),
        "not_an_option": dict(not_an_option=1),
    }
    for name, override in bad.items():
        with pytest.raises(ValueError, match=name):
            AutoencoderKLConfig.from_diffusers({**base, **override})


# -- tiling -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smooth_vae():
    """A VAE (factor 2) whose 3x3 kernels are blur-shaped, so smooth latents decode to smooth images.

    Trained decoders map smooth latents to smooth images. Random 3x3 kernels are high-pass: they would make the
    output noise-like, and a seam would hide in that noise. With blur-profile kernels the output is smooth, so the
    gradient energy along a tile border stands out if the tiles do not join.
    """
    vae = AutoencoderKL(AutoencoderKLConfig(**{**SMALL, "block_out_channels": (8, 16), "norm_num_groups": 4})).eval()
    randomize(vae, seed=7, smooth=True)
    return vae


def border_energy_ratio(image: torch.Tensor, borders: list[int]) -> tuple[float, float]:
    """Mean squared horizontal / vertical difference across the given column / row borders, over its mean elsewhere."""
    gx = (image[..., 1:] - image[..., :-1]).square().mean(dim=(0, 1, 2))  # gx[c - 1]: between columns c - 1 and c
    gy = (image[..., 1:, :] - image[..., :-1, :]).square().mean(dim=(0, 1, 3))
    at = torch.tensor(borders) - 1
    keep = torch.ones_like(gx, dtype=torch.bool)
    keep[at] = False
    return (gx[at].mean() / gx[keep].mean()).item(), (gy[at].mean() / gy[keep].mean()).item()


def tile_borders(cells: int, tile: int, overlap: int, scale: int) -> list[int]:
    """Output positions (pixels or cells) where some tile starts or ends."""
    starts = _tile_starts(cells, tile, overlap)
    return sorted({s * scale for s in starts[1:]} | {(s + tile) * scale for s in starts[:-1]})


def check_tiled(run, x, tiled, naive, untiled, *, cells: int, tile: int, overlap: int, scale_in: int, scale_out: int):
    """The acceptance checks shared by tiled decode and encode; ``tile`` and ``overlap`` count latent cells."""
    # 1. A convex combination of tiles: nowhere farther from the untiled result than the worst tile covering it.
    worst = torch.zeros_like(untiled)
    starts = _tile_starts(cells, tile, overlap)
    for i in starts:
        for j in starts:
            rows, cols = slice(i * scale_out, (i + tile) * scale_out), slice(j * scale_out, (j + tile) * scale_out)
            piece = run(x[..., i * scale_in : (i + tile) * scale_in, j * scale_in : (j + tile) * scale_in])
            worst[..., rows, cols] = torch.maximum(worst[..., rows, cols], (piece - untiled[..., rows, cols]).abs())
    assert ((tiled - untiled).abs() <= worst + 1e-5).all()
    # 2. Overlapping, blended tiles are closer to the untiled result than abutting ones (most of the remaining
    # difference is the per-tile GroupNorm statistics, which no blending removes).
    rms = lambda t: t.square().mean().sqrt().item()  # noqa: E731
    assert rms(tiled - untiled) < rms(naive - untiled), (rms(tiled - untiled), rms(naive - untiled))
    # 3. No seams: the gradient energy across tile borders is what the untiled output has there (within 25%; over
    # 20 seeds of weights and fields the largest deviation was 15%), while abutting tiles fail the same measure
    # (> 1.4x; 1.6x to 8x over those seeds), so the measure can see a seam.
    borders = tile_borders(cells, tile, overlap, scale_out)
    ratio_tiled, ratio_untiled = border_energy_ratio(tiled, borders), border_energy_ratio(untiled, borders)
    for r_tiled, r_untiled in zip(ratio_tiled, ratio_untiled, strict=True):
        assert abs(r_tiled / r_untiled - 1) < 0.25, (ratio_tiled, ratio_untiled)
    borders = tile_borders(cells, tile, 0, scale_out)
    ratio_naive, ratio_untiled = border_energy_ratio(naive, borders), border_energy_ratio(untiled, borders)
    assert max(n / u for n, u in zip(ratio_naive, ratio_untiled, strict=True)) > 1.4, (ratio_naive, ratio_untiled)


@torch.no_grad()
def test_tiled_decode(smooth_vae):
    """Decode four smooth 64x64 latents (twice the 32-cell tile) with tiling on and off.

    Tiles cannot reproduce the untiled decode exactly: each tile's GroupNorm statistics and its zero-padded border
    see only the tile (the known limit of tiled VAE decoding). So the bound on the difference is the one blending
    can promise: each output pixel is a convex combination of the tiles covering it, so it is never farther from
    the untiled result than the worst of those tiles decoded alone. Seams are measured by gradient energy.
    """
    vae, z = smooth_vae, smooth_field(4, 4, 64, knots=17, seed=8)
    untiled = vae.decode(z)
    vae.enable_tiling(tile_size=64, overlap=16)  # pixels: 32 latent cells, blended over 8
    tiled = vae.decode(z)
    vae.enable_tiling(tile_size=64, overlap=0)
    naive = vae.decode(z)
    vae.disable_tiling()
    assert _tile_starts(64, 32, 8) == [0, 16, 32]
    check_tiled(vae.decode, z, tiled, naive, untiled, cells=64, tile=32, overlap=8, scale_in=1, scale_out=2)


@torch.no_grad()
def test_tiled_encode(smooth_vae):
    """Encode four smooth 128x128 images (twice the 64-pixel tile) with tiling on and off; same checks on the mean."""
    vae, x = smooth_vae, smooth_field(4, 3, 128, knots=33, seed=9)
    untiled = vae.encode(x).mean
    vae.enable_tiling(tile_size=64, overlap=16)
    tiled = vae.encode(x).mean
    vae.enable_tiling(tile_size=64, overlap=0)
    naive = vae.encode(x).mean
    vae.disable_tiling()
    mean = lambda t: vae.encode(t).mean  # noqa: E731
    check_tiled(mean, x, tiled, naive, untiled, cells=64, tile=32, overlap=8, scale_in=2, scale_out=1)


def test_tile_blending_is_exact_for_a_local_map():
    """For a map without context (nearest upsampling / 2x2 pooling) tiling must reproduce it to rounding error."""
    z = randn(2, 4, 23, 37, seed=10)
    for tile, overlap in ((8, 2), (8, 4), (16, 0), (40, 8)):
        up = _tiled(lambda t: F.interpolate(t, scale_factor=2.0), z, tile, overlap, scale_out=2)
        torch.testing.assert_close(up, F.interpolate(z, scale_factor=2.0), atol=1e-6, rtol=0)
        down = _tiled(lambda t: F.avg_pool2d(t, 2), up, tile, overlap, scale_in=2)
        torch.testing.assert_close(down, z, atol=1e-6, rtol=0)


def test_tile_starts_cover_with_overlap():
    for length in range(1, 80):
        for tile, overlap in ((8, 0), (8, 2), (8, 4), (16, 4)):
            starts = _tile_starts(length, tile, overlap)
            assert starts[0] == 0 and starts[-1] + min(tile, length) == length
            assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))
            assert len(starts) == (1 if length <= tile else math.ceil((length - tile) / (tile - overlap)) + 1)


@torch.no_grad()
def test_tiling_is_a_no_op_below_the_tile_size(smooth_vae):
    x, z = randn(1, 3, 32, 32, seed=11), randn(1, 4, 16, 16, seed=12)
    expected_z, expected_x = smooth_vae.encode(x).mean, smooth_vae.decode(z)
    smooth_vae.enable_tiling(tile_size=32, overlap=8)
    try:
        assert torch.equal(smooth_vae.encode(x).mean, expected_z) and torch.equal(smooth_vae.decode(z), expected_x)
    finally:
        smooth_vae.disable_tiling()


# -- memory options ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae():
    model = AutoencoderKL(AutoencoderKLConfig(**SMALL)).eval()
    randomize(model, seed=13)
    return model


@torch.no_grad()
def test_sliced_equals_batched(vae):
    x, z = randn(3, 3, 16, 16, seed=14), randn(3, 4, 8, 8, seed=15)
    posterior, image = vae.encode(x), vae.decode(z)
    sliced = copy.deepcopy(vae)
    sliced.enable_slicing()
    assert_equal_to_rounding(sliced.encode(x).mean, posterior.mean)
    assert_equal_to_rounding(sliced.encode(x).std, posterior.std)
    assert_equal_to_rounding(sliced.decode(z), image)


@torch.no_grad()
def test_chunked_attention_and_channels_last_equal_default(vae):
    x, z = randn(2, 3, 16, 16, seed=16), randn(2, 4, 8, 8, seed=17)
    mean, image = vae.encode(x).mean, vae.decode(z)
    chunked = copy.deepcopy(vae)
    set_attention_mode(chunked, "chunked", chunk_size=7)  # 64 tokens: uneven chunks
    torch.testing.assert_close(chunked.encode(x).mean, mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.decode(z), image, atol=1e-5, rtol=0)
    last = copy.deepcopy(vae).to(memory_format=torch.channels_last)
    torch.testing.assert_close(last.encode(x.to(memory_format=torch.channels_last)).mean, mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(last.decode(z.to(memory_format=torch.channels_last)), image, atol=1e-5, rtol=0)


@torch.no_grad()
def test_packed_weights_match_pytorch_kernels_and_keep_the_input_layout(vae):
    x, z = randn(2, 3, 16, 16, seed=18), randn(2, 4, 8, 8, seed=19)
    plain = copy.deepcopy(vae)
    set_weight_packing(plain, False)
    posterior, image = vae.encode(x), vae.decode(z)
    assert packed_weight_bytes(vae) > 0 and image.is_contiguous()
    assert posterior.mean.stride() == plain.encode(x).mean.stride()  # a view of the moments, in x's layout
    torch.testing.assert_close(posterior.mean, plain.encode(x).mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(posterior.std, plain.encode(x).std, atol=1e-5, rtol=0)
    torch.testing.assert_close(image, plain.decode(z), atol=1e-5, rtol=0)
    last = vae.decode(z.to(memory_format=torch.channels_last))
    assert last.is_contiguous(memory_format=torch.channels_last) and not last.is_contiguous()


@torch.no_grad()
def test_prepare_for_inference_packs_in_place_and_keeps_fused_upsampling(vae):
    """The Pipeline's defaults for a VAE: conv weights packed in place, upsampling fused; the same images."""
    z = randn(2, 4, 8, 8, seed=20)
    model = copy.deepcopy(vae)
    prepare_for_inference(model)
    torch.testing.assert_close(model.decode(z), vae.decode(z), atol=1e-5, rtol=0)
    assert all(m.fused for m in model.modules() if isinstance(m, Upsample2D))
    assert any(m.weight.is_mkldnn for m in model.modules() if isinstance(m, Conv2d))


@torch.no_grad()
def test_bf16_close_to_fp32(vae):
    """bf16 keeps 8 mantissa bits (relative rounding 2**-9 ~ 2e-3 per op); over ~20 layers we allow 3% relative RMS."""
    x, z = randn(2, 3, 16, 16, seed=18), randn(2, 4, 8, 8, seed=19)
    mean, image = vae.encode(x).mean, vae.decode(z)
    half = copy.deepcopy(vae).to(torch.bfloat16)
    assert half.encoder.conv_norm_out.weight.dtype == torch.bfloat16  # GroupNorm32 computes in fp32 anyway
    for low, high in ((half.encode(x).mean, mean), (half.decode(z), image)):
        assert low.dtype == torch.bfloat16
        relative = (low.float() - high).square().mean().sqrt() / high.square().mean().sqrt()
        assert relative < 3e-2, relative


# -- posterior, latent scaling, formats, errors --------------------------------------------------------------------


@torch.no_grad()
def test_posterior_per_image_generators_and_kl(vae):
    posterior = vae.encode(randn(2, 3, 16, 16, seed=20))
    both = posterior.sample(generators(2))
    assert torch.equal(posterior.mode(), posterior.mean)
    assert posterior.kl().shape == (2,)
    alone = vae.encode(randn(2, 3, 16, 16, seed=20)[1:]).sample(generators(2)[1:])
    assert_equal_to_rounding(alone, both[1:])  # image i does not depend on the batch
    with pytest.raises(ValueError, match="one per image"):
        posterior.sample(generators(3))


def test_latent_scaling_round_trip():
    config = AutoencoderKLConfig(**SMALL, scaling_factor=0.3611, shift_factor=0.1159)
    model = AutoencoderKL(config)
    z = randn(1, 4, 4, 4, seed=21)
    torch.testing.assert_close(model.to_latent(z), (z - 0.1159) * 0.3611)
    torch.testing.assert_close(model.from_latent(model.to_latent(z)), z)
    plain = AutoencoderKL(AutoencoderKLConfig(**SMALL))
    torch.testing.assert_close(plain.to_latent(z), z * 0.18215)


@torch.no_grad()
def test_own_format_and_config_round_trip(vae, tmp_path):
    save_model(vae, tmp_path / "vae")
    loaded = load_model(tmp_path / "vae").eval()
    assert loaded.config == vae.config
    z = randn(1, 4, 8, 8, seed=22)
    assert torch.equal(loaded.decode(z), vae.decode(z))
    config = AutoencoderKLConfig(**SMALL, shift_factor=0.5, use_quant_conv=False)
    config.save(tmp_path / "config.json")
    assert AutoencoderKLConfig.load(tmp_path / "config.json") == config
    assert json.loads((tmp_path / "config.json").read_text())["block_out_channels"] == [32, 64]
    with pytest.raises(ValueError, match="bogus"):
        AutoencoderKLConfig.from_dict({**config.to_dict(), "bogus": 1})


def test_config_validation_names_the_field():
    bad = {
        "block_out_channels": dict(block_out_channels=(32, 60)),  # 60 is no multiple of 8 groups
        "latent_channels": dict(latent_channels=0),
        "sample_size": dict(sample_size=33),
        "scaling_factor": dict(scaling_factor=-1.0),
        "shift_factor": dict(shift_factor=float("nan")),
        "force_upcast": dict(force_upcast="yes"),
    }
    for name, override in bad.items():
        with pytest.raises(ValueError, match=name):
            AutoencoderKLConfig(**{**SMALL, **override})


def test_bad_input_errors(vae):
    with pytest.raises(ValueError, match=r"x has shape \(1, 4, 16, 16\).*\(batch, 3, height, width\)"):
        vae.encode(randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"x has shape \(1, 3, 15, 16\).*multiples of the downsampling factor 2"):
        vae.encode(randn(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"z has shape \(1, 3, 8, 8\).*\(batch, 4, height, width\)"):
        vae.decode(randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="tile_size=33"):
        vae.enable_tiling(tile_size=33)
    with pytest.raises(ValueError, match="overlap=20"):
        vae.enable_tiling(tile_size=32, overlap=20)
    assert vae.tile_size is None
