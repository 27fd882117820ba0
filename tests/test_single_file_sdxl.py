"""Single-file SDXL base, refiner and inpainting checkpoints in Stability's sgm layout: the same images as diffusers'
``from_single_file``, bit-exact round trips through ``unnoise convert``, the full-size layout of the shipped configs
(on the meta device), the prediction type, bad files.

The single files are written here from tiny random diffusers pipelines by a converter that follows the published
key conventions (SD's U-Net, VAE and OpenCLIP maps of ``test_single_file``, sgm's ``label_emb`` and
``conditioner.embedders.N.``, OpenCLIP's ``x @ text_projection``), not the library's plans.
"""

import json

import diffusers
import numpy as np
import pytest
import torch
from helpers import randomize, tiny_tokenizer
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_sdxl import assert_match, input_image, pixels, scheduler, text_config, tiny_vae
from test_single_file import (
    assert_bit_exact,
    convert_all,
    half_loaded_as_bf16,
    openclip_keys,
    unet_keys,
    vae_keys,
    variant,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from unnoise import Pipeline
from unnoise.models import single_file as sf
from unnoise.models.text import DualCLIPTextEncoder
from unnoise.pipeline.loading import load_components, load_single_file

PROMPT, NEGATIVE = "a red cat", "blue dog"
STEPS = 5
TIME_DIM = 8
BIGG = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}
CLIP_L = "conditioner.embedders.0.transformer.text_model."


# -- tiny SDXL pipelines and their single files ------------------------------------------------------------------------


def tiny_unet(kind: str, in_channels: int = 4) -> diffusers.UNet2DConditionModel:
    """SDXL's layouts in small: base (no attention in the first level, deeper transformers further down, six time
    ids) and refiner (four levels, attention in the middle two, one depth, five time ids with the aesthetic score)."""
    if kind == "refiner":
        levels = dict(
            block_out_channels=(32, 48, 64, 64), attention_head_dim=(2, 3, 4, 4), transformer_layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=48, projection_class_embeddings_input_dim=24 + 5 * TIME_DIM,
        )  # fmt: skip
    else:
        levels = dict(
            block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 2, 3),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=80, projection_class_embeddings_input_dim=24 + 6 * TIME_DIM,
        )  # fmt: skip
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=2, norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM, **levels,
    ).eval()  # fmt: skip


def to_sgm(states: dict, unet_config: dict, vae_config: dict) -> dict:
    """Diffusers/transformers state dicts ("unet", "vae", "text_encoder" unless a refiner, "text_encoder_2") under
    Stability's sgm single-file keys, plus what real files carry besides (position ids, logit scale, sigmas)."""
    unet = dict(states["unet"])
    added = {k: unet.pop(k) for k in list(unet) if k.startswith("add_embedding.")}
    out = {"model.diffusion_model." + k: v for k, v in unet_keys(unet, unet_config).items()}
    for hf, sgm in (("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2.")):
        out |= {"model.diffusion_model." + k.replace(hf, sgm): v for k, v in added.items() if k.startswith(hf)}
    out |= {"first_stage_model." + k: v for k, v in vae_keys(states["vae"], vae_config).items()}
    refiner = "text_encoder" not in states
    if not refiner:
        out |= {CLIP_L + k.removeprefix("text_model."): v for k, v in states["text_encoder"].items()}
        out[CLIP_L + "embeddings.position_ids"] = torch.arange(16)[None]
    bigg, second = BIGG["refiner" if refiner else "base"], dict(states["text_encoder_2"])
    projection = second.pop("text_projection.weight")  # a Linear's (out, in); OpenCLIP multiplies x @ (in, out)
    out |= {bigg + k: v for k, v in openclip_keys(second).items()}
    out |= {bigg + "text_projection": projection.T, bigg + "logit_scale": torch.tensor(4.6)}
    out["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000)
    return {k: v.contiguous() for k, v in out.items()}


def folder_states(folder) -> dict:
    parts = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
    parts |= {name: "model" for name in ("text_encoder", "text_encoder_2") if (folder / name).is_dir()}
    return {name: load_file(folder / name / f"{file}.safetensors") for name, file in parts.items()}


def write_file(folder, path) -> None:
    config = {name: json.loads((folder / name / "config.json").read_text()) for name in ("unet", "vae")}
    save_file(to_sgm(folder_states(folder), config["unet"], config["vae"]), str(path))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (diffusers pipeline, its folder, its single file)} for SDXL base, inpainting and refiner."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sdxl")
    tokenizer = tiny_tokenizer(root)
    first = CLIPTextModel(text_config(tokenizer, 32)).eval()
    second = CLIPTextModelWithProjection(text_config(tokenizer, 48)).eval()
    modules = {
        "first": first, "second": second, "vae": tiny_vae(), "base": tiny_unet("base"),
        "inpaint": tiny_unet("base", in_channels=9), "refiner": tiny_unet("refiner"),
    }  # fmt: skip
    for i, module in enumerate(modules.values()):
        randomize(module, seed=30 + i, smooth=isinstance(module, diffusers.AutoencoderKL))
    common = dict(vae=modules["vae"], text_encoder_2=second, tokenizer_2=tokenizer, scheduler=scheduler())
    base = dict(common, text_encoder=first, tokenizer=tokenizer, add_watermarker=False)
    pipes = {
        "base": diffusers.StableDiffusionXLPipeline(**base, unet=modules["base"]),
        "inpaint": diffusers.StableDiffusionXLInpaintPipeline(**base, unet=modules["inpaint"]),
        "refiner": diffusers.StableDiffusionXLImg2ImgPipeline(
            **common, text_encoder=None, tokenizer=None, unet=modules["refiner"], requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False, add_watermarker=False,
        ),
    }  # fmt: skip
    out = {}
    for name, pipe in pipes.items():
        folder = root / name
        pipe.save_pretrained(folder)
        write_file(folder, root / f"{name}.safetensors")
        out[name] = (pipe, folder, root / f"{name}.safetensors")
    return out


def theirs_from_file(cls, path, folder):
    pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(n: int = 2, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


# -- 1. the same images as diffusers' from_single_file -----------------------------------------------------------------


def test_base_matches_diffusers_from_single_file(models):
    original, folder, path = models["base"]
    theirs = theirs_from_file(diffusers.StableDiffusionXLPipeline, path, folder)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):  # the test's converter is diffusers' inverse
        expected = getattr(original, name).state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in getattr(theirs, name).state_dict().items()), name
    pipe = Pipeline.from_single_file(path, config=folder)
    assert isinstance(pipe.text_encoder, DualCLIPTextEncoder) and pipe.text_encoder.dim == 80
    assert pipe.config.text_encoder.kind == "sdxl" and pipe.config.text_encoder.force_zeros_for_empty_prompt
    assert (pipe.single_file.family, pipe.single_file.prediction) == ("sdxl-base", "epsilon")
    assert pipe.time_id_count == 6
    for negative in (NEGATIVE, None):  # None: zeroed unconditional embeddings (force_zeros_for_empty_prompt)
        settings = dict(negative_prompt=negative, guidance_scale=5.0, height=32, width=32, latents=latents())
        with torch.no_grad():
            expected = theirs(
                PROMPT, num_images_per_prompt=2, num_inference_steps=STEPS, output_type="np", **settings
            ).images
        got = pixels(pipe(PROMPT, num_images=2, steps=STEPS, sampler="euler", seed=0, **settings))
        assert_match(expected, got, f"SDXL base single file, negative {negative!r}")


def test_refiner_matches_diffusers_from_single_file(models):
    _, folder, path = models["refiner"]
    theirs = theirs_from_file(diffusers.StableDiffusionXLImg2ImgPipeline, path, folder)
    pipe = Pipeline.from_single_file(path, config=folder)
    assert pipe.text_encoder.first is None and pipe.single_file.family == "sdxl-refiner"
    assert pipe.time_id_count == 5 and not pipe.config.text_encoder.force_zeros_for_empty_prompt
    image = input_image(32, 32)
    call = dict(image=image, strength=0.6, negative_prompt=NEGATIVE, guidance_scale=5.0, aesthetic_score=7.5)
    with torch.no_grad():
        expected = theirs(
            PROMPT, num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(9)], output_type="np", **call
        ).images
    got = pixels(pipe(PROMPT, steps=STEPS, sampler="euler", seed=9, **call))
    assert_match(expected, got, "SDXL refiner single file")


def test_inpainting_file_gives_the_folder_images(models):
    """A 9-channel SDXL file is SDXL inpainting: the same images as the model loaded from its diffusers folder."""
    _, folder, path = models["inpaint"]
    pipe = Pipeline.from_single_file(path, config=folder)
    assert pipe.single_file.family == "sdxl-inpainting" and pipe.unet.config.in_channels == 9
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 28))
    call = dict(image=input_image(32, 32), mask=mask, strength=1.0, steps=3, seed=4, sampler="euler")
    assert np.array_equal(pixels(pipe(PROMPT, **call)), pixels(Pipeline.from_pretrained(folder)(PROMPT, **call)))


# -- 2. round trips through `unnoise convert` ------------------------------------------------------------------------


def networks(source) -> dict:
    """Every network tensor of a single file (the skipped keys left out), or of a folder (text keys without
    ``text_model.``)."""
    if source.is_file():
        skipped = ("position_ids", "logit_scale", "denoiser.sigmas")
        return {k: v for k, v in load_file(source).items() if not k.endswith(skipped)}
    return {
        f"{name}/{k.removeprefix('text_model.')}": v for name, s in folder_states(source).items() for k, v in s.items()
    }


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_round_trips_are_bit_exact(models, name, tmp_path):
    _, folder, path = models[name]
    convert_all(path, folder, tmp_path)
    original = networks(folder)
    for written in ("d", "d2"):  # d2 came through our folder u
        assert_bit_exact(networks(tmp_path / written), original)
    for file in ("s.safetensors", "s2.safetensors"):
        assert_bit_exact(networks(tmp_path / file), networks(path))
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "epsilon"
    index = json.loads((tmp_path / "d2" / "model_index.json").read_text())
    expected = json.loads((folder / "model_index.json").read_text())
    for key in ("_class_name", "text_encoder", "text_encoder_2", "force_zeros_for_empty_prompt"):
        assert (key, index[key]) == (key, expected[key])
    assert index.get("requires_aesthetics_score") == expected.get("requires_aesthetics_score")
    for written in ("d", "d2", "u"):  # the written folders load as SDXL, with the source's empty-prompt rule
        parts = load_components(tmp_path / written)
        assert isinstance(parts.text_encoder, DualCLIPTextEncoder) and (parts.text_encoder.first is None) == (
            name == "refiner"
        )
        assert parts.config.text_encoder.force_zeros_for_empty_prompt == (name == "base")
    if name == "refiner":  # the written diffusers folder is what diffusers loads, images included
        theirs = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "d2", add_watermarker=False)
        assert theirs.config.requires_aesthetics_score and theirs.text_encoder is None


# -- 3. the shipped configs: the full-size layouts, on the meta device -----------------------------------------------


def full_size_file(name: str, path) -> dict:
    """A full-size SDXL single file of meta tensors (no data), as diffusers and transformers build the published
    models from the shipped configs, written with the plain converter as a pickle."""
    folder = sf.FAMILY_CONFIGS / f"sdxl-{name}"
    config = {part: json.loads((folder / part / "config.json").read_text()) for part in ("unet", "vae")}
    states = {}
    with torch.device("meta"):
        states["unet"] = diffusers.UNet2DConditionModel.from_config(config["unet"]).state_dict()
        states["vae"] = diffusers.AutoencoderKL.from_config(config["vae"]).state_dict()
        for part, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if (folder / part).is_dir():
                states[part] = cls(CLIPTextConfig.from_json_file(folder / part / "config.json")).state_dict()
    state = to_sgm(states, config["unet"], config["vae"])
    torch.save(state, path)
    return state


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_full_size_layout_of_the_shipped_configs(name, tmp_path):
    path = tmp_path / f"sd_xl_{name}.ckpt"
    state = full_size_file(name, path)
    if name == "base":  # the published sd_xl_base_1.0.safetensors: 2515 keys, 1680 of them the U-Net's
        assert len(state) - 1 == 2515  # less the sigmas
        assert sum(k.startswith("model.diffusion_model.") for k in state) == 1680
    parts = load_single_file(path, allow_pickle=True)  # every key used or skipped, every shape as configured
    assert parts.single_file.family == f"sdxl-{name}" and parts.single_file.prediction == "epsilon"
    encoder = parts.text_encoder
    assert isinstance(encoder, DualCLIPTextEncoder) and encoder.dim == {"base": 2048, "refiner": 1280}[name]
    assert encoder.pooled_dim == 1280 and encoder.second.model.config.num_hidden_layers == 32
    assert sum(p.numel() for p in parts.unet.parameters()) == {"base": 2_567_463_684, "refiner": 2_259_526_660}[name]
    assert parts.vae.config.scaling_factor == 0.13025 and parts.vae.config.force_upcast
    assert parts.config.text_encoder.force_zeros_for_empty_prompt == (name == "base")
    assert parts.config.sampling.sampler == "euler" and parts.config.sampling.spacing == "leading"
    pads = [e.tokenizer.pad_token for e in encoder.encoders]
    assert pads == (["<|endoftext|>", "!"] if name == "base" else ["!"])
    assert encoder.second.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


# -- 4. what the file is and bad files ------------------------------------------------------------------------------


def test_prediction_type(models, tmp_path):
    _, folder, path = models["base"]
    tagged = variant(path, tmp_path, "v.safetensors", metadata={"modelspec.prediction_type": "v"})
    marked = variant(path, tmp_path, "marked.safetensors", add={"v_pred": torch.tensor([])})
    config = tmp_path / "configs"  # a config folder without a scheduler: the shipped one, no prediction_type
    config.mkdir()
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        (config / part).symlink_to(folder / part)
    for file, expected in ((path, "epsilon"), (tagged, "v_prediction"), (marked, "v_prediction")):
        assert load_single_file(file, config=config).config.prediction == expected
    parts = load_single_file(tagged, config=config, prediction="epsilon")
    assert (parts.config.prediction, parts.single_file.prediction_source) == ("epsilon", "the prediction argument")
    assert parts.config.text_encoder.force_zeros_for_empty_prompt  # the shipped SDXL base model_index.json


def test_bad_files_are_named(models, tmp_path):
    _, folder, path = models["base"]
    projection = BIGG["base"] + "text_projection"
    missing = variant(path, tmp_path, "missing.safetensors", drop=[projection])
    extra = variant(path, tmp_path, "extra.safetensors", add={"conditioner.embedders.2.model.w": torch.zeros(1)})
    cases = {
        missing: rf"missing\.safetensors: 1 missing keys: \['{projection}'\]; the networks are configured from",
        extra: r"extra\.safetensors: 1 unknown keys: \['conditioner\.embedders\.2\.model\.w'\]",
    }
    for bad, message in cases.items():
        with pytest.raises(ValueError, match=message) as caught:
            load_single_file(bad, config=folder)
        assert "\n" not in str(caught.value)
    sd1 = tmp_path / "sd1"  # an SD 1.x config folder for an SDXL file
    (sd1 / "scheduler").mkdir(parents=True)
    (sd1 / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    (sd1 / "pipeline.json").write_text(json.dumps({"text_encoder": {"kind": "clip"}}))
    with pytest.raises(ValueError, match=r"sd1: text_encoder\.kind='clip'; a Stable Diffusion XL base single file's"):
        load_single_file(path, config=sd1)
    refiner = variant(
        models["refiner"][2], tmp_path, "refiner9.safetensors",
        add={"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)},
    )  # fmt: skip
    with pytest.raises(ValueError, match="refiner9.safetensors: a Stable Diffusion XL refiner U-Net with 9 input"):
        load_single_file(refiner, config=models["refiner"][1])


def test_dtype_and_convert_to_fp16(models, tmp_path):
    _, folder, path = models["base"]
    parts = half_loaded_as_bf16(path, folder, tmp_path)
    projection = load_file(folder / "text_encoder_2" / "model.safetensors")["text_projection.weight"]
    assert torch.equal(parts.text_encoder.second.model.text_projection.weight, projection.half().bfloat16())
