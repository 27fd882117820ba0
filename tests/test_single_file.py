"""Single-file SD 1.x / 2.x / inpainting checkpoints: the same images as diffusers' ``from_single_file``, bit-exact
round trips through ``unnoise convert``, the prediction-type rule, the CLIP tokenizer shipped as merges, bad files.

The single files are written here from tiny random diffusers pipelines by a converter that follows the published
key conventions (diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py``, generalized from SD's four
levels of two layers to any), not the library's plans.
"""

import argparse
import gzip
import html
import json
import logging
import re
import shutil
import string

import diffusers
import numpy as np
import pytest
import regex
import torch
from helpers import SD_SCHEDULER, SIZE, randomize, tiny_components, tiny_tokenizer
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from unnoise import Pipeline
from unnoise.cli_convert import add_parser
from unnoise.models import single_file as sf
from unnoise.models.tensor_files import Checkpoint
from unnoise.pipeline.convert import convert
from unnoise.pipeline.loading import load_components, load_single_file

PROMPT, NEGATIVE = "a red cat", "blue dog"
OPENCLIP_LAYERS = 24  # the file's; SD 2.x's text encoder uses the first 23 (the penultimate layer's output)


# -- a tiny model in each family and its single file ------------------------------------------------------------------


def sd2_components(folder) -> dict:
    """Tiny SD 2.x: linear projections in the transformers, an OpenCLIP-like (GELU) text encoder of 23 layers."""
    tokenizer = tiny_tokenizer(folder)
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=OPENCLIP_LAYERS,
        num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        hidden_act="gelu",
    )  # fmt: skip
    full = CLIPTextModel(text).eval()  # all 24 layers, as in the file
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
    ).eval()  # fmt: skip
    vae = tiny_components(folder)["vae"]
    for i, module in enumerate((full, unet)):
        randomize(module, seed=10 + i)
    with torch.no_grad():  # a 768-v-like weight statistic: std 0.15 > 0.09 (ComfyUI's v-prediction test)
        unet.up_blocks[-1].attentions[-1].transformer_blocks[0].norm1.bias.copy_(0.15 * torch.linspace(-1.7, 1.7, 32))
    text.num_hidden_layers = OPENCLIP_LAYERS - 1
    encoder = CLIPTextModel(text).eval()
    encoder.load_state_dict(full.state_dict(), strict=False)
    return dict(text_encoder=encoder, tokenizer=tokenizer, unet=unet, vae=vae), full


def inpainting_components(folder) -> dict:
    components = tiny_components(folder)
    config = {k: v for k, v in components["unet"].config.items() if not k.startswith("_")}
    unet = diffusers.UNet2DConditionModel(**{**config, "in_channels": 9}).eval()
    randomize(unet, seed=20)
    return {**components, "unet": unet}


def to_original(folder, text_full=None) -> dict:
    """A diffusers folder's tensors under the original CompVis/Stability keys, plus what real files carry besides."""
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    config = json.loads((folder / "unet" / "config.json").read_text())
    out = {"model.diffusion_model." + k: v for k, v in unet_keys(unet, config).items()}
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    out |= {"first_stage_model." + k: v for k, v in vae_keys(vae, vae_config).items()}
    if text_full is None:
        text = load_file(folder / "text_encoder" / "model.safetensors")
        out |= {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in text.items()}
        out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(16)[None]
    else:
        out |= {"cond_stage_model.model." + k: v for k, v in openclip_keys(text_full.state_dict()).items()}
        out["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
        out["cond_stage_model.model.text_projection"] = torch.randn(32, 32)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    out |= {"betas": betas.float(), "alphas_cumprod": torch.cumprod(1 - betas, 0).float()}
    out |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32)}
    return {k: v.contiguous() for k, v in out.items()}


def unet_keys(state: dict, config: dict) -> dict:
    """The published U-Net map: input block 1 + (L+1) i + j, output block (L+1) i + j, resnet layer renames."""
    n, per = len(config["block_out_channels"]), config["layers_per_block"] + 1
    pairs = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
             ("middle_block.1.", "mid_block.attentions.0.")]  # fmt: skip
    pairs += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    for i in range(n):
        for j in range(per - 1):
            pairs.append((f"input_blocks.{per * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            pairs.append((f"input_blocks.{per * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            pairs.append((f"input_blocks.{per * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        for j in range(per):
            pairs.append((f"output_blocks.{per * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            pairs.append((f"output_blocks.{per * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        has_attention = "CrossAttn" in config["up_block_types"][i]
        if i < n - 1:
            pairs.append(
                (f"output_blocks.{per * i + per - 1}.{2 if has_attention else 1}.", f"up_blocks.{i}.upsamplers.0.")
            )
    layer = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
             ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]  # fmt: skip
    out = {}
    for key, value in state.items():
        for sd, hf in pairs:
            if key.startswith(hf):
                rest = key[len(hf) :]
                if "resnets" in hf:
                    for sd_layer, hf_layer in layer:
                        rest = rest.replace(hf_layer + ".", sd_layer + ".") if rest.startswith(hf_layer + ".") else rest
                out[sd + rest] = value
                break
        else:
            raise AssertionError(f"no original name for {key}")
    return out


def vae_keys(state: dict, config: dict) -> dict:
    """The published VAE map: string replacements, decoder stages numbered bottom-up, 1x1-conv attention weights."""
    n, layers = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = [
        ("nin_shortcut", "conv_shortcut"),
        ("norm_out", "conv_norm_out"),
        ("mid.attn_1.", "mid_block.attentions.0."),
    ]
    for i in range(n):
        pairs += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(layers)]
        pairs += [
            (f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.") for j in range(layers + 1)
        ]
        if i < n - 1:
            pairs.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            pairs.append((f"up.{n - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
    pairs += [(f"mid.block_{i + 1}.", f"mid_block.resnets.{i}.") for i in range(2)]
    attention = [
        ("norm.", "group_norm."),
        ("q.", "to_q."),
        ("k.", "to_k."),
        ("v.", "to_v."),
        ("proj_out.", "to_out.0."),
    ]
    out = {}
    for key, value in state.items():
        for sd, hf in pairs:
            key = key.replace(hf, sd)
        if "attentions" in key or "attn_1" in key:
            for sd, hf in attention:
                key = key.replace(hf, sd)
            if key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
                value = value[:, :, None, None]
        out[key] = value
    return out


def openclip_keys(state: dict) -> dict:
    """The published OpenCLIP text map: resblocks, ln_1/ln_2, c_fc/c_proj, q/k/v fused as in_proj."""
    renames = [("encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
               (".fc1.", ".c_fc."), (".fc2.", ".c_proj."), (".self_attn", ".attn"), ("final_layer_norm.", "ln_final."),
               ("embeddings.token_embedding.weight", "token_embedding.weight"),
               ("embeddings.position_embedding.weight", "positional_embedding")]  # fmt: skip
    out, fused = {}, {}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        if key.endswith("position_ids"):
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key)
        if m:
            fused.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        for hf, sd in renames:
            key = key.replace(hf, sd)
        out[key] = value
    for (layer, kind), parts in fused.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def write_case(folder, case: str) -> tuple:
    """(diffusers folder, single file, diffusers pipeline class) of a tiny model in ``case``'s family."""
    folder.mkdir()
    full = None
    if case == "sd2":
        components, full = sd2_components(folder)
        scheduler = diffusers.DDIMScheduler(**SD_SCHEDULER, prediction_type="v_prediction")
    elif case == "sd1-inpainting":
        components = inpainting_components(folder)
        scheduler = diffusers.DDIMScheduler(**SD_SCHEDULER)
    else:
        components = tiny_components(folder)
        scheduler = diffusers.DDIMScheduler(**SD_SCHEDULER)
    cls = diffusers.StableDiffusionInpaintPipeline if "inpainting" in case else diffusers.StableDiffusionPipeline
    pipe = cls(
        **components, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(folder / "diffusers")
    path = folder / f"{case}.safetensors"
    save_file(to_original(folder / "diffusers", full), str(path))
    return folder / "diffusers", path, cls


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return {case: write_case(root / case, case) for case in ("sd1", "sd2", "sd1-inpainting")}


def ours(path, **kwargs) -> Pipeline:
    parts = load_single_file(path, **kwargs)
    return Pipeline(parts.unet, parts.vae, parts.text_encoder, parts.config, name=path.stem, unet_weights=path)


def latents(seed=7):
    return torch.randn(2, 4, SIZE // 4, SIZE // 4, generator=torch.Generator().manual_seed(seed))


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(img, dtype=np.float64) / 255 for img in images])


# -- 1. the same images as diffusers' from_single_file -----------------------------------------------------------


@pytest.mark.parametrize("case", ["sd1", "sd2"])
def test_images_match_diffusers_from_single_file(cases, case, tmp_path):
    folder, path, cls = cases[case]
    theirs = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    # SD 2.x: ours decides v-prediction from the file (a config folder without a scheduler: the shipped one)
    config = tmp_path / "configs"
    shutil.copytree(folder, config, ignore=shutil.ignore_patterns("scheduler"))
    parts = load_single_file(path, config=config if case == "sd2" else folder)
    expected_prediction = "v_prediction" if case == "sd2" else "epsilon"
    assert parts.config.prediction == theirs.scheduler.config.prediction_type == expected_prediction
    assert parts.single_file.family == case
    pipe = Pipeline(parts.unet, parts.vae, parts.text_encoder, parts.config)
    kwargs = dict(negative_prompt=NEGATIVE, guidance_scale=6.0, height=SIZE, width=SIZE, latents=latents())
    with torch.no_grad():
        expected = theirs(PROMPT, num_images_per_prompt=2, num_inference_steps=8, output_type="np", **kwargs).images
    got = pixels(pipe(PROMPT, num_images=2, steps=8, seed=0, sampler="ddim", **kwargs))
    assert expected.std() > 0.1
    error = np.abs(got - expected).max()
    print(f"{case}: max abs pixel difference {error * 255:.3f}/255")
    assert error <= 2 / 255


def test_inpainting_networks_match_diffusers_and_the_folder(cases):
    """The 9-channel U-Net, the VAE and the text encoder as diffusers loads them from the file; and inpainting with
    the single file gives exactly the images of the same model loaded from its diffusers folder."""
    folder, path, cls = cases["sd1-inpainting"]
    theirs = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    parts = load_single_file(path, config=folder)
    assert parts.single_file.family == "sd1-inpainting" and parts.unet.config.in_channels == 9
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 9, SIZE // 4, SIZE // 4, generator=g), torch.randn(2, 16, 32, generator=g)
    image = torch.rand(1, 3, SIZE, SIZE, generator=g) * 2 - 1
    ids = theirs.tokenizer([PROMPT], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        pairs = [
            (
                parts.unet(x, 500, encoder_hidden_states=context),
                theirs.unet(x, 500, encoder_hidden_states=context).sample,
            ),
            (parts.vae.decode(x[:, :4]), theirs.vae.decode(x[:, :4]).sample),
            (parts.text_encoder.encode([PROMPT]).hidden_states, theirs.text_encoder(ids)[0]),
            (parts.vae.encode(image).mean, theirs.vae.encode(image).latent_dist.mean),
        ]
    for got, expected in pairs:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, : SIZE // 2] = 255
    init = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    call = dict(image=Image.fromarray(init), mask=Image.fromarray(mask), steps=4, seed=1, guidance_scale=3.0)
    single = Pipeline(parts.unet, parts.vae, parts.text_encoder, parts.config)(PROMPT, **call)
    from_folder = Pipeline.from_pretrained(folder)(PROMPT, **call)
    assert np.array_equal(pixels(single), pixels(from_folder))


# -- 2. round trips through `unnoise convert` ------------------------------------------------------------------------


def run_convert(*argv):
    parser = argparse.ArgumentParser(prog="unnoise")
    add_parser(parser.add_subparsers())
    args = parser.parse_args([str(a) for a in argv])
    args.run(args)


def convert_all(path, folder, out) -> None:
    """``path`` -> diffusers ``d`` -> single file ``s``; ``path`` -> unnoise ``u`` -> diffusers ``d2`` and single file
    ``s2``, all in ``out``, through the CLI (``folder`` configures the file)."""
    run_convert("convert", path, out / "d", "--to", "diffusers", "--config", folder)
    run_convert("convert", out / "d", out / "s.safetensors", "--to", "single-file")
    run_convert("convert", path, out / "u", "--to", "unnoise", "--config", folder)
    run_convert("convert", out / "u", out / "d2", "--to", "diffusers")
    run_convert("convert", out / "u", out / "s2.safetensors", "--to", "single-file")


def tensors(path) -> dict:
    """Every tensor of a single file, or of a folder's three networks (text encoder keys without ``text_model.``)."""
    if path.is_file():
        return load_file(path)
    out = {}
    for part in ("unet", "vae", "text_encoder"):
        for file in (path / part).glob("*.safetensors"):
            out |= {f"{part}/{k.removeprefix('text_model.')}": v for k, v in load_file(file).items()}
    return out


def assert_bit_exact(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].view(-1).view(torch.uint8), b[key].view(-1).view(torch.uint8)), key


@pytest.mark.parametrize("case", ["sd1", "sd2", "sd1-inpainting"])
def test_round_trips_are_bit_exact(cases, case, tmp_path):
    folder, path, _ = cases[case]
    convert_all(path, folder, tmp_path)
    original = tensors(folder)
    assert_bit_exact(tensors(tmp_path / "d"), original)
    assert_bit_exact(tensors(tmp_path / "d2"), original)
    networks = {
        k: v for k, v in load_file(path).items() if k.startswith(("model.", "first_stage_model.", "cond_stage_model."))
    }
    networks = {
        k: v
        for k, v in networks.items()
        if not re.search(r"position_ids|logit_scale|text_projection|resblocks\.23\.", k)
    }
    assert_bit_exact(load_file(tmp_path / "s.safetensors"), networks)
    assert_bit_exact(load_file(tmp_path / "s2.safetensors"), networks)
    for name in ("unet/config.json", "vae/config.json", "text_encoder/config.json"):
        assert json.loads((tmp_path / "d" / name).read_text()) == json.loads((folder / name).read_text())
    scheduler = json.loads((tmp_path / "d2" / "scheduler" / "scheduler_config.json").read_text())
    assert diffusers.DDIMScheduler.from_config(scheduler).config.prediction_type == (
        "v_prediction" if case == "sd2" else "epsilon"
    )
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == ("v" if case == "sd2" else "epsilon")
    for written in ("d", "u"):  # the written diffusers and unnoise folders load as any other
        assert load_components(tmp_path / written).config.prediction == ("v_prediction" if case == "sd2" else "epsilon")


@pytest.mark.parametrize(
    "scheduler",
    [
        dict(SD_SCHEDULER, _class_name="DDIMScheduler"),
        dict(SD_SCHEDULER, _class_name="PNDMScheduler", skip_prk_steps=True),  # runs as dpmpp_2m, stays PNDM
        dict(_class_name="EulerDiscreteScheduler", beta_schedule="scaled_linear", timestep_spacing="trailing"),
        dict(_class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True, prediction_type="v_prediction"),
        dict(_class_name="DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", final_sigmas_type="zero"),
        dict(_class_name="UniPCMultistepScheduler", beta_schedule="squaredcos_cap_v2", steps_offset=1),
    ],
    ids=lambda c: c["_class_name"],
)
def test_pipeline_json_to_a_diffusers_scheduler_translates_back(scheduler):
    """unnoise -> diffusers writes a scheduler config that ``translate_scheduler`` reads as the same pipeline.json."""
    from unnoise.pipeline import PipelineConfig, translate_scheduler
    from unnoise.pipeline.convert import diffusers_scheduler_config

    schedule, prediction, sampling = translate_scheduler(scheduler)
    config = PipelineConfig(prediction=prediction, schedule=schedule, sampling=sampling)
    assert translate_scheduler(diffusers_scheduler_config(config)) == (schedule, prediction, sampling)


def half_loaded_as_bf16(path, folder, tmp_path):
    """``path`` converted to a float16 single file, loaded in bfloat16: every network in bfloat16 (as diffusers'
    torch_dtype), except SDXL's VAE, float32 by its force_upcast (diffusers' SD 1.x/2.x pipelines ignore the flag,
    its SDXL ones upcast; as Pipeline.to)."""
    half = tmp_path / "half.safetensors"
    convert(path, half, to="single-file", dtype=torch.float16, config=folder)
    assert {v.dtype for v in load_file(half).values()} == {torch.float16}
    parts = load_single_file(half, config=folder, dtype=torch.bfloat16)
    sdxl = parts.unet.config.addition_embed_type == "text_time"
    assert parts.unet.dtype == torch.bfloat16 and parts.vae.config.force_upcast
    assert parts.vae.dtype == (torch.float32 if sdxl else torch.bfloat16)
    assert parts.text_encoder.dtype == torch.bfloat16
    return parts


def test_dtype_conversion_and_loading(cases, tmp_path):
    folder, path, _ = cases["sd1"]
    parts = half_loaded_as_bf16(path, folder, tmp_path)
    reference = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"]
    assert torch.equal(parts.unet.conv_in.weight, reference.half().bfloat16())
    tokens = load_file(folder / "text_encoder" / "model.safetensors")["embeddings.token_embedding.weight"]
    assert torch.equal(parts.text_encoder.model.get_input_embeddings().weight, tokens.half().bfloat16())
    pipe = Pipeline(parts.unet, parts.vae, parts.text_encoder, parts.config)  # bfloat16 states into the U-Net
    assert pipe(PROMPT, steps=2, seed=0, height=SIZE, width=SIZE)[0].size == (SIZE, SIZE)


def test_conversions_in_the_worker_match_plain_conversion(cases):
    """Every tensor converted while loading (in the loader's worker thread, in pieces; SD 2.x's fused q/k/v split
    first) equals the file's tensor converted by ``.to``."""
    from unnoise.models.tensor_files import load_network
    from unnoise.pipeline.layouts import read_single_file

    folder, path, _ = cases["sd2"]
    plain = load_single_file(path, config=folder)
    half = load_single_file(path, config=folder, dtype=torch.float16)
    layout = read_single_file(path, prediction=None, config=folder, allow_pickle=False, ema=False)
    try:  # without a worker: converted in the caller's thread
        unet = load_network(layout.nets["unet"], layout.tensors["unet"], dtype=torch.float16, source=str(path))
    finally:
        layout.close()
    pairs = [(plain.unet, half.unet), (plain.unet, unet), (plain.vae, half.vae)]
    pairs.append((plain.text_encoder.model, half.text_encoder.model))
    for theirs, mine in pairs:
        state = mine.state_dict()
        for key, value in theirs.state_dict().items():
            expected = value.half() if value.is_floating_point() else value
            assert state[key].dtype == expected.dtype and torch.equal(state[key], expected), key
    assert half.vae.dtype == torch.float16 and not mine.training


def test_checkpoint_maps_each_tensor_as_safetensors_reads_it(tmp_path):
    """Tensors read from our own map of the file: equal to safetensors' ``load_file``, each with its own storage, a
    misaligned one (after a 1-element float16 tensor) copied aligned, an empty one; pages handed back
    (``_release_all``) read again unchanged."""
    from unnoise.models.tensor_files import Lazy, _release_all, write_safetensors

    g = torch.Generator().manual_seed(0)
    values = {
        "a.half": torch.randn(1, generator=g).half(),
        "b.misaligned": torch.randn(3, 5, generator=g),
        "c.bf16": torch.randn(4, 1024, generator=g).bfloat16(),
        "d.empty": torch.zeros(0, 3),
        "e.ids": torch.arange(7),
        "f.mask": torch.tensor([True, False]),  # the next tensor aligned again
        "g.big": torch.randn(3000, 7, generator=g),
    }
    path = tmp_path / "mixed.safetensors"
    write_safetensors(path, {k: Lazy(tuple(v.shape), v.dtype, lambda _=None, v=v: v) for k, v in values.items()})
    expected = load_file(path)
    with Checkpoint(path) as ckpt:
        assert ckpt.keys == sorted(values) and ckpt.shape("b.misaligned") == (3, 5)
        read = {k: ckpt.get(k) for k in ckpt.keys}
        views = {k for k, lazy in ckpt.lazy().items() if lazy.mapped}
        assert ckpt.dtype("c.bf16") == torch.bfloat16 and ckpt.get("g.big", torch.float16).dtype == torch.float16
    for key, tensor in read.items():
        assert tensor.dtype == expected[key].dtype and torch.equal(tensor, expected[key]), key
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    assert read["b.misaligned"].data_ptr() % 4 == 0 and views == {"a.half", "c.bf16", "f.mask", "g.big"}
    _release_all([read["g.big"], read["c.bf16"]])
    assert torch.equal(read["g.big"], values["g.big"]) and torch.equal(read["c.bf16"], values["c.bf16"])


# -- 3. what the file is: family, prediction type, EMA ----------------------------------------------------------------


def variant(path, tmp_path, name, *, drop=(), add=None, metadata=None):
    state = {k: v for k, v in load_file(path).items() if k not in drop}
    out = tmp_path / name
    save_file({**state, **(add or {})}, str(out), metadata=metadata)
    return out


def test_prediction_rule(cases, tmp_path):
    folder, path, _ = cases["sd2"]
    key = max(k for k in load_file(path) if k.endswith("transformer_blocks.0.norm1.bias") and "output" in k)
    assert key == "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.norm1.bias"
    base = variant(path, tmp_path, "base.safetensors", add={key: torch.linspace(-0.03, 0.03, 32)})
    with Checkpoint(path) as ckpt:
        assert sf.detect_prediction(ckpt, sf.FAMILIES["sd2"])[0] == "v_prediction"
    with Checkpoint(base) as ckpt:
        prediction, why = sf.detect_prediction(ckpt, sf.FAMILIES["sd2"])
        assert prediction == "epsilon" and "<= 0.09" in why
    marked = variant(base, tmp_path, "marked.safetensors", add={"v_pred": torch.tensor([])})
    tagged = variant(path, tmp_path, "tagged.safetensors", metadata={"modelspec.prediction_type": "epsilon"})
    with Checkpoint(marked) as a, Checkpoint(tagged) as b:
        assert sf.detect_prediction(a, sf.FAMILIES["sd2"])[0] == "v_prediction"
        assert sf.detect_prediction(b, sf.FAMILIES["sd2"])[0] == "epsilon"
    with Checkpoint(cases["sd1"][1]) as ckpt:
        assert sf.detect_prediction(ckpt, sf.FAMILIES["sd1"]) == (
            "epsilon",
            "Stable Diffusion 1.x is epsilon-prediction",
        )
    # the argument, then the config folder's scheduler, then the file
    assert load_single_file(base, config=folder).config.prediction == "v_prediction"  # the folder's scheduler says v
    parts = load_single_file(path, config=folder, prediction="epsilon")
    assert (parts.config.prediction, parts.single_file.prediction_source) == ("epsilon", "the prediction argument")
    step = tmp_path / "step.ckpt"
    torch.save({"state_dict": load_file(path), "global_step": 875000}, step)
    with Checkpoint(step, allow_pickle=True) as ckpt:
        assert sf.detect_prediction(ckpt, sf.FAMILIES["sd2"])[0] == "epsilon"  # diffusers: SD 2.0 512-base


def test_shipped_family_configs_build_full_size_networks(cases):
    """Without config=, the networks are the real SD 1.5 / 2.1 shapes; the tiny files then name their mismatch."""
    with pytest.raises(ValueError, match=r"sd1\.safetensors: .*missing keys: .*families/sd1"):
        Pipeline.from_pretrained(cases["sd1"][1])  # a file: load_single_file with the shipped configs
    from unnoise.models.tensor_files import state_keys
    from unnoise.pipeline.layouts import networks, read_configs

    for family, (channels, heads) in {"sd1": (768, 8), "sd2": (1024, 5)}.items():
        configs = read_configs([sf.FAMILY_CONFIGS / family], ("text_encoder",))
        nets = networks(configs)
        assert nets["text_encoder"].config.hidden_size == channels and configs.unet.attention_shape(0)[0] == heads
        assert sum(p.numel() for p in nets["unet"].parameters()) in (859520964, 865910724)  # SD 1.5, SD 2.1 U-Nets
        assert sum(p.numel() for p in nets["vae"].parameters()) == 83653863
        for net in nets.values():  # the loader's one walk of the modules names what state_dict() names
            assert state_keys(net) == list(net.state_dict())


def test_meta_networks_skip_initialisers_and_restore_them():
    """Building on the meta device runs no initialiser, yet a module with real tensors built meanwhile (another
    thread's, say) is initialised, and afterwards every initialiser is back."""
    from transformers import PreTrainedModel

    from unnoise.models.tensor_files import meta_network

    originals = torch.nn.Linear.reset_parameters, torch.nn.Conv2d.__dict__.get("reset_parameters")
    calls = []
    initialise = PreTrainedModel.init_weights

    def build():
        real = torch.nn.Linear(16, 16, device="cpu")  # inside the meta device mode, on the CPU: initialised
        calls.append(real.weight.detach().clone())
        return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Conv2d(3, 3, 3))

    net = meta_network(build)
    assert all(p.is_meta for p in net.parameters())
    assert 0 < calls[0].abs().max() <= 0.25 and calls[0].std() > 0.05  # kaiming-uniform in +-1/sqrt(16)
    assert (torch.nn.Linear.reset_parameters, torch.nn.Conv2d.__dict__.get("reset_parameters")) == originals
    assert PreTrainedModel.init_weights is initialise


def test_ema_weights_load_when_asked(cases, tmp_path, caplog):
    folder, path, _ = cases["sd1"]
    state = load_file(path)
    ema = {sf.ema_key(k): v * 0.5 for k, v in state.items() if k.startswith("model.diffusion_model.")}
    with_ema = variant(path, tmp_path, "ema.safetensors", add=ema)
    regular, averaged = load_single_file(with_ema, config=folder), load_single_file(with_ema, config=folder, ema=True)
    assert torch.equal(averaged.unet.conv_in.weight, regular.unet.conv_in.weight * 0.5) and averaged.single_file.ema
    with caplog.at_level(logging.WARNING, logger="unnoise.loading"):
        assert not load_single_file(path, config=folder, ema=True).single_file.ema
    assert "holds no EMA weights" in caplog.text


# -- 4. bad files: one line naming the file and the problem ---------------------------------------------------------


def test_bad_files_are_named(cases, tmp_path):
    folder, path, _ = cases["sd1"]
    first = sorted(k for k in load_file(path) if k.startswith("model.diffusion_model."))[0]
    unknown = tmp_path / "unknown.safetensors"
    save_file({"some.weight": torch.zeros(2)}, str(unknown))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    pickle = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(path)}, pickle)
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(pickle.read_bytes()[:1000])
    flux = tmp_path / "flux.safetensors"
    save_file({"model.diffusion_model.double_blocks.0.img_mod.lin.weight": torch.zeros(2)}, str(flux))
    missing = variant(path, tmp_path, "missing.safetensors", drop=[first])
    extra = variant(path, tmp_path, "extra.safetensors", add={"cond_stage_model.foo.weight": torch.zeros(1)})
    cases_ = {
        unknown: r"unknown\.safetensors: unknown family: no Stable Diffusion text encoder .*\['some\.weight'\] \(1 ",
        truncated: r"truncated\.safetensors is not a readable safetensors file \(truncated or damaged\?\)",
        pickle: r"model\.ckpt is a pickle, which can run arbitrary code .* allow_pickle=True",
        broken: r"broken\.ckpt is not a readable PyTorch pickle \(truncated or damaged\?\)",
        flux: r"flux\.safetensors is a Flux checkpoint .* not supported; supported single files: .* SDXL refiner",
        missing: rf"missing\.safetensors: 1 missing keys: \['{re.escape(first)}'\]",
        extra: r"extra\.safetensors: 1 unknown keys: \['cond_stage_model\.foo\.weight'\]",
    }
    for bad, message in cases_.items():
        with pytest.raises(ValueError, match=message) as caught:
            load_single_file(bad, config=folder, allow_pickle=bad == broken)
        assert "\n" not in str(caught.value)
    loaded = load_single_file(pickle, config=folder, allow_pickle=True)
    assert torch.equal(loaded.unet.conv_in.weight, load_file(path)["model.diffusion_model.input_blocks.0.0.weight"])


# -- 5. the CLIP tokenizer shipped as merges -------------------------------------------------------------------------


class SimpleTokenizer:
    """OpenAI CLIP's tokenizer (clip/simple_tokenizer.py, also open_clip's), re-implemented plainly (no ftfy: the
    prompts below are already clean)."""

    def __init__(self, merges_gz):
        merges = [
            tuple(m.split()) for m in gzip.open(merges_gz).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        ]
        merges = [m for m in merges if m]
        bs = (
            list(range(ord("!"), ord("~") + 1))
            + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1))
        )
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        self.byte_encoder = dict(zip(bs, map(chr, cs)))
        vocab = list(self.byte_encoder.values())
        vocab = (
            vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        )
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.ranks = dict(zip(merges, range(len(merges))))
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text):
        text = " ".join(html.unescape(html.unescape(text)).split()).strip().lower()
        ids = []
        for token in regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(token)]
        return [49406, *ids, 49407]


PROMPTS = [
    "a photo of a cat",
    "A Photograph of an Astronaut riding a horse on Mars, 4k, highly detailed!!",
    "masterpiece, best quality, (detailed:1.2), 1girl, looking at viewer",
    "don't stop: it's 3.14159 o'clock & we're fine",
    "café crème brûlée — naïve façade, 東京の夜景, Ünïcödé",
    "emoji 🐱🚀 and symbols #$%^*()[]{}<>|\\/~`",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "  spaces   and\ttabs\nnewlines  ",
    string.ascii_letters + string.digits + string.punctuation,
]


def test_shipped_tokenizer_matches_openai_clip(tmp_path):
    for family in ("sd1", "sd2"):
        sf.write_clip_tokenizer(tmp_path / family, sf.FAMILIES[family])
    reference = SimpleTokenizer(sf.CLIP_MERGES)
    assert len(reference.encoder) == 49408 and reference.encoder == sf.clip_bpe()[0]
    sd1 = CLIPTokenizer.from_pretrained(tmp_path / "sd1")
    sd2 = CLIPTokenizer.from_pretrained(tmp_path / "sd2")
    in_memory = sf.clip_tokenizer(sf.FAMILIES["sd2"])  # what load_single_file uses without config=
    assert sd1("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's published ids
    for prompt in PROMPTS:
        assert sd1(prompt).input_ids == reference.encode(prompt), prompt
        assert in_memory(prompt, padding="max_length").input_ids == sd2(prompt, padding="max_length").input_ids
        if "!" not in prompt:
            assert sd2(prompt).input_ids == reference.encode(prompt), prompt
    # SD 2.x's tokenizer in diffusers' layout pads with "!" (id 0, as OpenCLIP pads), which makes "!" a special token:
    # "wow!" ends in id 0 there, not OpenCLIP's "!</w>" (256). Kept, as diffusers' SD 2.x folders have it.
    assert sd2("wow!").input_ids[-2:] == [0, 49407] and reference.encode("wow!")[-2:] == [256, 49407]
    assert (sd1.pad_token_id, sd2.pad_token_id, in_memory.pad_token_id) == (49407, 0, 0)  # OpenCLIP pads with "!"
    assert sd1.model_max_length == in_memory.model_max_length == 77
    assert sf.CLIP_MERGES.stat().st_size < 250_000
    lines = gzip.decompress(sf.CLIP_MERGES.read_bytes()).decode("utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and sf.clip_bpe()[1] == lines[1:]


def random_prompts(n, seed=0):
    """Prompts of words, digits, punctuation, accents, CJK, emoji, apostrophes and runs of white space."""
    rng = np.random.default_rng(seed)
    pieces = [*string.ascii_letters, *string.digits, *string.punctuation, " ", "  ", "\t", "\n", "'s", "'ll", "é"]
    pieces += ["ü", "ß", "ø", "东京", "の", "🐱", "🚀", "—", "…", "ﬁ", "Ω", "ñ", "<|endoftext|>", "a photo of", "cat"]
    return ["".join(rng.choice(pieces, size=rng.integers(1, 40))) for _ in range(n)]


def test_tokenizer_built_in_memory_matches_the_written_folder_and_openai_clip(tmp_path):
    """What load_single_file builds without config= (``clip_tokenizer``, vocabulary and merges made from the shipped
    merges in memory) against the same tokenizer read by transformers from written vocab.json/merges.txt, and
    against the plain re-implementation of OpenAI's tokenizer, on 300 random prompts."""
    sf.write_clip_tokenizer(tmp_path / "sd1", sf.FAMILIES["sd1"])
    folder = CLIPTokenizer.from_pretrained(tmp_path / "sd1")
    in_memory = sf.clip_tokenizer(sf.FAMILIES["sd1"])
    reference = SimpleTokenizer(sf.CLIP_MERGES)
    assert in_memory.get_vocab() == folder.get_vocab() and len(in_memory) == 49408
    prompts = random_prompts(300)
    assert in_memory(prompts).input_ids == folder(prompts).input_ids
    for prompt in prompts:
        if "<|endoftext|>" not in prompt:  # OpenAI's regex keeps it one token; transformers' added token too
            assert in_memory(prompt).input_ids == reference.encode(prompt), prompt
    padded = in_memory(prompts[:20], padding="max_length", max_length=77, truncation=True).input_ids
    assert padded == folder(prompts[:20], padding="max_length", max_length=77, truncation=True).input_ids


@pytest.mark.slow
def test_loading_benchmark_runs_on_a_tiny_model(tmp_path):
    from benchmarks import loading

    report = tmp_path / "loading.md"
    (case,) = loading.main(["--tiny", "--runs", "1", "--dtypes", "fp16", "--report", str(report)])
    assert case["ours"]["dtypes"] == case["diffusers"]["dtypes"] == "float16/float16/float16"  # SD 1.5: no upcast
    assert case["ours"]["seconds"] > 0 and case["diffusers"]["model_bytes"] > 0
    text = report.read_text()
    assert text.count("| fp16, ") == 2 and "benchmarks/loading.py --tiny --runs 1 --dtypes fp16 --report" in text
