"""LoRA: parity with diffusers + PEFT on a tiny random Stable Diffusion model (PEFT and kohya files, scales, stacking,
fusion), our saved files read by diffusers, LoCon against a plainly merged U-Net, every refusal, and the library API.

diffusers loads a LoRA into the text encoder through transformers' PEFT integration. transformers 5's ``add_adapter``
wants peft >= 0.22 (not released when this was written), so the text encoder's random LoRA is injected with PEFT's
own ``inject_adapter_in_model``; loading files (``load_lora_weights``) does not go through that version check.
"""

import copy
import hashlib
import json
import logging
import threading
import warnings

import diffusers
import numpy as np
import pytest
import torch
from diffusers.utils import convert_state_dict_to_kohya
from helpers import SD_SCHEDULE, SIZE, tiny_components
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from unnoise import Pipeline
from unnoise.models import lora
from unnoise.models.layers import set_upsample_fusion
from unnoise.pipeline import Request
from unnoise.pipeline.png import parse_parameters

RANK = 4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
PROMPT, NEGATIVE = "a red cat", "blue dog"
TOLERANCE = 2  # of 255: the acceptance bound for our images against diffusers'
VISIBLE = 40  # of 255: the least largest pixel change a LoRA must make for a comparison to mean something


# -- the tiny model, its LoRA files and diffusers' pipeline ------------------------------------------------------------


def sd_pipeline(components: dict) -> diffusers.StableDiffusionPipeline:
    pipe = diffusers.StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        scheduler=diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading", steps_offset=1),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def randomize_lora(module: torch.nn.Module, seed: int, gain: float) -> None:
    """Redraw every LoRA parameter: ``lora_A`` ~ N(0, 1/fan_in), ``lora_B`` ~ N(0, gain^2 / rank)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5 * (gain if "lora_B" in name else 1))


def peft_lora(components: dict, seed: int, alpha: float) -> tuple[dict, dict, LoraConfig, LoraConfig]:
    """A random rank-4 LoRA with ``lora_alpha=alpha`` made by diffusers/PEFT on copies of the U-Net (attention,
    conv ``proj_in``, resnet convs: LoCon) and the CLIP text encoder: (unet state, text state, their configs)."""
    unet, text = copy.deepcopy(components["unet"]), copy.deepcopy(components["text_encoder"])
    unet_config = LoraConfig(r=RANK, lora_alpha=alpha, init_lora_weights=False, target_modules=UNET_TARGETS)
    text_config = LoraConfig(r=RANK, lora_alpha=alpha, init_lora_weights=False, target_modules=TEXT_TARGETS)
    unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, text)  # transformers 5's add_adapter: see the module docstring
    randomize_lora(unet, seed, 0.5)
    randomize_lora(text, seed + 1, 0.5)
    return get_peft_model_state_dict(unet), get_peft_model_state_dict(text), unet_config, text_config


def save_kohya(unet_state: dict, text_state: dict, path, alpha: float | None = None) -> None:
    """diffusers' own PEFT -> kohya converter (which writes alpha = rank), with ``alpha`` written over it if given."""
    state = {
        **{f"unet.{k}": v for k, v in unet_state.items()},
        **{f"text_encoder.{k}": v for k, v in text_state.items()},
    }
    kohya = convert_state_dict_to_kohya(state)
    if alpha is not None:
        kohya = {k: torch.tensor(alpha) if k.endswith(".alpha") else v for k, v in kohya.items()}
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(path))


@pytest.fixture(scope="module", autouse=True)
def quiet_diffusers():
    """diffusers logs spurious "missing keys" for every second adapter it loads (they are there: checked below)."""
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity(logging.ERROR)
    yield
    diffusers.utils.logging.set_verbosity(level)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """The tiny model: its folder, diffusers' pipeline with LoRAs "a" (PEFT file, alpha 8 = 2 x rank), "a_kohya" (the
    same LoRA through diffusers' kohya converter, alpha 8 written back) and "b_kohya" (another, converter's alpha =
    rank) loaded, and the files."""
    components = tiny_components(tmp_path_factory.mktemp("tokenizer"))
    folder = tmp_path_factory.mktemp("sd")
    sd_pipeline(components).save_pretrained(folder)
    files = tmp_path_factory.mktemp("loras")
    unet_a, text_a, unet_config, text_config = peft_lora(components, seed=10, alpha=2 * RANK)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        files, unet_lora_layers=unet_a, text_encoder_lora_layers=text_a, weight_name="a.safetensors",
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )  # fmt: skip
    save_kohya(unet_a, text_a, files / "a_kohya.safetensors", alpha=2 * RANK)
    unet_b, text_b, _, _ = peft_lora(components, seed=20, alpha=RANK)
    save_kohya(unet_b, text_b, files / "b_kohya.safetensors")
    theirs = sd_pipeline(components)
    for name in ("a", "a_kohya", "b_kohya"):
        theirs.load_lora_weights(str(files / f"{name}.safetensors"), adapter_name=name)
    return dict(folder=folder, theirs=theirs, files=files, components=components)


@pytest.fixture(scope="module")
def ours(sd):
    """Ours from the same folder with the same three files loaded at scale 0."""
    pipe = Pipeline.from_pretrained(sd["folder"])
    for name in ("a", "a_kohya", "b_kohya"):
        assert pipe.load_lora(sd["files"] / f"{name}.safetensors", 0.0) == name
    return pipe


@pytest.fixture
def fresh(sd):
    """Ours from the tiny folder with nothing loaded, for tests that change it."""
    return Pipeline.from_pretrained(sd["folder"])


def latents() -> torch.Tensor:
    return torch.randn(1, 4, SIZE // 4, SIZE // 4, generator=torch.Generator().manual_seed(7))


CALL = dict(negative_prompt=NEGATIVE, guidance_scale=6.0, height=SIZE, width=SIZE)


def their_image(theirs, adapters: dict[str, float] | None) -> np.ndarray:
    """diffusers' image (0..255 floats) with exactly ``adapters`` at their weights (None: LoRAs disabled)."""
    if adapters:
        theirs.enable_lora()
        theirs.set_adapters(list(adapters), adapter_weights=list(adapters.values()))
    else:
        theirs.disable_lora()
    with torch.no_grad():
        image = theirs(PROMPT, num_inference_steps=6, output_type="np", latents=latents(), **CALL).images[0]
    theirs.enable_lora()
    return image.astype(np.float64) * 255


def our_image(pipe: Pipeline, **settings) -> np.ndarray:
    image = pipe(PROMPT, steps=6, seed=0, latents=latents(), **CALL, **settings)[0]
    return np.asarray(image, dtype=np.float64)


def assert_real_image(image: np.ndarray) -> None:
    """Not blank, not saturated: a comparison of it can fail."""
    assert image.std() > 25 and 0.05 < (image > 127).mean() < 0.95 and (image > 250).mean() < 0.5


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def set_scales(pipe: Pipeline, scales: dict[str, float]) -> None:
    """These adapters at these scales, the other loaded ones at 0."""
    pipe.set_lora_scales({name: scales.get(name, 0.0) for name in pipe.loras})


# -- 1. parity with diffusers + PEFT ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "adapters",
    [{"a": 1.0}, {"a": 0.5}, {"a_kohya": 1.0}, {"b_kohya": 1.0}, {"a": 0.7, "b_kohya": 0.4}],
    ids=["peft", "peft-half", "kohya-alpha-8", "kohya-converter", "stacked"],
)
def test_images_match_diffusers(sd, ours, adapters):
    base = their_image(sd["theirs"], None)
    expected = their_image(sd["theirs"], adapters)
    set_scales(ours, adapters)
    got = our_image(ours)
    assert_real_image(expected)
    error, change = max_diff(got, expected), max_diff(expected, base)
    print(f"{adapters}: max pixel difference {error:.3f}/255 (the LoRA changes the image by up to {change:.0f}/255)")
    assert change > VISIBLE
    assert error <= TOLERANCE


def test_text_encoder_lora_matches_diffusers(sd, ours):
    """The text encoder's part on its own: prompt embeddings equal diffusers' at each scale, and differ from base."""
    theirs = sd["theirs"]

    def their_embedding(adapters):
        theirs.set_adapters(list(adapters), adapter_weights=list(adapters.values()))
        with torch.no_grad():
            return theirs.encode_prompt(PROMPT, "cpu", 1, False)[0]

    base = ours.text_encoder.encode([PROMPT]).hidden_states
    for adapters in ({"a": 1.0}, {"a": 0.5}, {"b_kohya": 1.0}):
        set_scales(ours, adapters)
        got = ours.text_encoder.encode([PROMPT]).hidden_states
        expected = their_embedding(adapters)
        assert (expected - base).abs().max() > 0.3
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_same_lora_in_both_formats_gives_the_same_image(ours):
    set_scales(ours, {"a": 1.0})
    peft = our_image(ours)
    set_scales(ours, {"a_kohya": 1.0})
    assert max_diff(our_image(ours), peft) <= 1


def test_fused_and_unfused_match_diffusers(sd, ours):
    theirs, adapters = sd["theirs"], {"a": 0.7, "b_kohya": 0.4}
    base = their_image(theirs, None)
    unfused = their_image(theirs, adapters)
    set_scales(ours, adapters)
    our_unfused = our_image(ours)
    weights = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    theirs.fuse_lora(components=["unet", "text_encoder"], adapter_names=list(adapters))
    try:
        with torch.no_grad():
            fused = theirs(PROMPT, num_inference_steps=6, output_type="np", latents=latents(), **CALL).images[0] * 255
    finally:
        theirs.unfuse_lora(components=["unet", "text_encoder"])
    assert ours.fuse_lora() == 52 + 12  # layers changed: both adapters update the same ones
    try:
        assert ours.lora_fused
        our_fused = our_image(ours)
    finally:
        assert ours.unfuse_lora() == 52 + 12
    print(f"fused: {max_diff(our_fused, fused):.3f}/255, ours fused vs unfused {max_diff(our_fused, our_unfused)}/255")
    assert max_diff(fused, base) > VISIBLE
    assert max_diff(our_fused, fused) <= TOLERANCE
    assert max_diff(our_fused, our_unfused) <= 1
    assert max_diff(their_image(theirs, adapters), unfused) <= 1  # theirs un-fused again
    assert np.array_equal(our_image(ours), our_unfused)  # ours: the base weights are back bit for bit
    assert all(torch.equal(v, weights[k]) for k, v in ours.unet.state_dict().items())


# -- 2. our files load into diffusers --------------------------------------------------------------------------------


def our_adapter(pipe: Pipeline, seed: int, *, mixed_alphas: bool) -> lora.LoRAAdapter:
    """A random adapter on our U-Net (attention, ``proj_in``, every conv larger than 1x1) and CLIP text encoder, two
    of its layers at rank 2 (a rank pattern). Alphas: 2 on linear layers and 6 on the 3x3 convs (kohya's LoCon
    ``conv_alpha``), or with ``mixed_alphas`` 6 on every third layer whatever it is (an alpha pattern)."""
    g = torch.Generator().manual_seed(seed)
    networks = {"unet": pipe.unet, "text_encoder": pipe.text_encoder.lora_root()}
    targets = (*lora.ATTENTION_TARGETS, "proj_in", *TEXT_TARGETS)
    adapter = lora.LoRAAdapter.create(networks, rank=RANK, alpha=2.0, targets=targets, convs=True, generator=g)
    for net, path, fan_in in (("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 32),
                              ("text_encoder", "encoder.layers.1.mlp.fc2", 64)):  # fmt: skip
        down = torch.randn(2, fan_in, generator=g) / fan_in**0.5
        adapter.add(net, path, lora.LoRALayer(down, torch.zeros(32, 2), 2.0, kind="linear"))
    with torch.no_grad():
        for i, layer in enumerate(adapter.layers.values()):
            layer.up.copy_(torch.randn(layer.up.shape, generator=g) / layer.rank**0.5 * 0.6)
            if (i % 3 == 0) if mixed_alphas else layer.kind == "conv":
                layer.alpha = 6.0
    return adapter


@pytest.mark.parametrize("format", lora.LORA_FORMATS)
def test_saved_lora_loads_in_diffusers(sd, fresh, tmp_path, format):
    """diffusers 0.42's kohya reader loses per-layer alphas of attention and text-encoder layers (it names their
    alpha_pattern keys after its old attention processors, ``attn1.processor.to_v_lora.down.weight``, and cuts the
    text encoder's to the parent module, ``text_model.encoder.layers.0.self_attn``): the kohya file varies alpha
    where kohya's trainer does and diffusers can follow, between linear layers and LoCon convs."""
    adapter = our_adapter(fresh, seed=5, mixed_alphas=format == "diffusers")
    counts = adapter.counts()
    path = lora.save_lora(adapter, tmp_path / f"ours_{format}.safetensors", format=format)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    clip_layer = "text_model.encoder.layers.0.self_attn.q_proj"  # the spelling AUTOMATIC1111 and older diffusers read
    if format == "kohya":
        assert f"lora_te_{clip_layer.replace('.', '_')}.lora_down.weight" in keys
    else:
        assert f"text_encoder.{clip_layer}.lora_A.weight" in keys
    name = f"ours_{format}"
    theirs = sd["theirs"]
    theirs.load_lora_weights(str(path), adapter_name=name)
    try:
        for net, module in (("unet", theirs.unet), ("text_encoder", theirs.text_encoder)):
            got = sum(1 for m in module.modules() if name in getattr(m, "lora_A", {}))
            assert got == counts[net], f"diffusers put {got} of {counts[net]} {net} layers"
        expected = their_image(theirs, {name: 0.8})
        base = their_image(theirs, None)
    finally:
        theirs.delete_adapters(name)
    assert fresh.load_lora(path, 0.8) == name
    assert fresh.lora_info[name].layers == counts
    got = our_image(fresh)
    error = max_diff(got, expected)
    print(f"save_lora({format}) read by diffusers: max pixel difference {error:.3f}/255")
    assert_real_image(expected)
    assert max_diff(expected, base) > VISIBLE
    assert error <= TOLERANCE


def test_save_lora_spells_text_encoders_as_readers_expect(ours, tmp_path):
    """Two CLIP encoders: ``lora_te1_``/``lora_te2_`` with CLIP's ``text_model`` level, read back to the same
    layers; a BERT encoder (MiniLM) keeps its plain path."""
    clip = ours.text_encoder.lora_root()
    g = torch.Generator().manual_seed(0)
    adapter = lora.LoRAAdapter.create(
        {"text_encoder": clip, "text_encoder_2": clip}, rank=2, alpha=1.0, targets=("q_proj", "fc1"), generator=g
    )
    path = lora.save_lora(adapter, tmp_path / "two.safetensors")
    with safe_open(str(path), "pt") as f:
        stems = {key.partition(".")[0] for key in f.keys()}
    expected = {
        f"lora_te{i}_text_model_encoder_layers_{layer}_{part}" for i in (1, 2) for layer in (0, 1)
        for part in ("self_attn_q_proj", "mlp_fc1")
    }  # fmt: skip
    assert stems == expected
    file = lora.read_lora(path)
    assert sorted(file.networks) == ["text_encoder", "text_encoder_2"]
    back = lora.adapter_from_file(file, {"text_encoder": clip, "text_encoder_2": clip})
    assert back.targets == adapter.targets
    for key, layer in adapter.layers.items():
        assert torch.equal(back.layers[key].down, layer.down) and back.layers[key].alpha == layer.alpha

    minilm = Pipeline.from_pretrained("default").text_encoder.lora_root()
    bert = lora.LoRAAdapter.create({"text_encoder": minilm}, rank=2, alpha=1.0, targets=("query",), generator=g)
    for format, key in [
        ("kohya", "lora_te_encoder_layer_0_attention_self_query.lora_down.weight"),
        ("diffusers", "text_encoder.encoder.layer.0.attention.self.query.lora_A.weight"),
    ]:
        path = lora.save_lora(bert, tmp_path / f"bert_{format}.safetensors", format=format)
        with safe_open(str(path), "pt") as f:
            assert key in f.keys()
        assert lora.adapter_from_file(lora.read_lora(path), {"text_encoder": minilm}).targets == bert.targets


# -- 3. LoCon against a plainly merged U-Net -------------------------------------------------------------------------


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700.0, 40.0]), torch.randn(2, 16, 32, generator=g)


def unet_out(unet) -> torch.Tensor:
    x, t, context = unet_inputs()
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=context)


def locon_layers() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Kohya (down, up) pairs: 3x3 LoCon downs with 1x1 ups on resnet convs, the stride-2 downsampler and the
    upsampler conv; a 1x1 conv pair on ``proj_in`` (our TokenConv2d); a linear-shaped pair on a 1x1 conv shortcut."""
    g = torch.Generator().manual_seed(11)
    shapes = {  # path: (out, in, kernel)
        "down_blocks.0.resnets.0.conv1": (32, 32, 3),
        "down_blocks.1.resnets.0.conv2": (64, 64, 3),
        "down_blocks.0.downsamplers.0.conv": (32, 32, 3),
        "up_blocks.0.upsamplers.0.conv": (64, 64, 3),
        "up_blocks.1.resnets.1.conv2": (32, 32, 3),
        "down_blocks.0.attentions.0.proj_in": (32, 32, 1),
        "down_blocks.1.resnets.0.conv_shortcut": (64, 32, None),  # 2-D pair on a 1x1 conv
    }
    out = {}
    for path, (o, i, k) in shapes.items():
        down = torch.randn(RANK, i, *((k, k) if k else ()), generator=g) / (i * (k or 1) ** 2) ** 0.5
        up = torch.randn(o, RANK, *((1, 1) if k else ()), generator=g) / RANK**0.5 * 0.5
        out[path] = (down, up)
    return out


def save_locon(layers: dict, path, alpha: float) -> None:
    state = {}
    for module, (down, up) in layers.items():
        stem = "lora_unet_" + module.replace(".", "_")
        state |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha)}
    save_file(state, str(path))


def merged_unet(folder, layers: dict, scale: float, alpha: float, fused_upsampling: bool):
    """Our U-Net with ``W + scale * alpha / rank * up @ down`` written into each layer's weight by hand."""
    unet = Pipeline.from_pretrained(folder).unet
    set_upsample_fusion(unet, fused_upsampling)
    with torch.no_grad():
        for path, (down, up) in layers.items():
            module = unet.get_submodule(path)
            module.unpack_in_place()
            w = module.weight
            w += scale * alpha / RANK * (up.flatten(1) @ down.flatten(1)).view_as(w)
    return unet


@pytest.mark.parametrize("fused_upsampling", [False, True])
def test_locon_matches_merged_weights(sd, tmp_path, fused_upsampling):
    """Each layer alone, then all of them: un-fused (hooks) and fused equal the hand-merged U-Net to fp32 rounding;
    with fused upsampling the upsampler must run its conv's own forward (where the hook is)."""
    layers, scale, alpha = locon_layers(), 0.8, 3.0
    unet = Pipeline.from_pretrained(sd["folder"]).unet
    set_upsample_fusion(unet, fused_upsampling)
    base = unet_out(unet)
    cases = {path: {path: layers[path]} for path in layers} | {"all": layers}
    for case, chosen in cases.items():
        path = tmp_path / f"{case}.safetensors"
        save_locon(chosen, path, alpha)
        info = unet.load_lora(path, scale, name="locon")
        assert info.layers == {"unet": len(chosen)} and info.format == "kohya"
        expected = unet_out(merged_unet(sd["folder"], chosen, scale, alpha, fused_upsampling))
        unfused = unet_out(unet)
        assert unet.fuse_lora() == len(chosen)
        fused = unet_out(unet)
        unet.unfuse_lora()
        tol = 2e-5 * expected.abs().max().item()
        errors = ((unfused - expected).abs().max().item(), (fused - expected).abs().max().item())
        change = (expected - base).abs().max().item()
        print(f"{case}: change {change:.3g}, un-fused / fused error {errors[0]:.2g} / {errors[1]:.2g}")
        assert change > 1000 * tol, case
        assert max(errors) <= tol, case
        assert unet.unload_lora() == ["locon"]
        assert torch.equal(unet_out(unet), base)


def test_default_model_fuse_and_unfuse_with_packed_weights():
    """The embedded model, whose conv weights the pipeline packs in place for oneDNN: fused equals un-fused, and
    unfusing puts back every base weight bit for bit (U-Net and MiniLM text encoder)."""
    pipe = Pipeline.from_pretrained("default")
    kwargs = dict(steps=4, seed=3)
    base = np.asarray(pipe("a handwritten 7", **kwargs)[0], dtype=np.float64)  # runs once: the weights are packed
    assert any(m.weight.is_mkldnn for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d))
    networks = {"unet": pipe.unet, "text_encoder": pipe.text_encoder.lora_root()}
    states = {name: {k: v.clone() for k, v in net.state_dict().items()} for name, net in networks.items()}
    g = torch.Generator().manual_seed(1)
    targets = ("to_q", "to_v", "query")
    adapter = lora.LoRAAdapter.create(networks, rank=4, alpha=4.0, targets=targets, convs=True, generator=g)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.up.copy_(torch.randn(layer.up.shape, generator=g) / layer.rank**0.5 * 0.3)
    pipe.add_lora(adapter, "x")
    unfused = np.asarray(pipe("a handwritten 7", **kwargs)[0], dtype=np.float64)
    pipe.fuse_lora()
    fused = np.asarray(pipe("a handwritten 7", **kwargs)[0], dtype=np.float64)
    assert pipe.unfuse_lora() == len(adapter.layers)
    print(f"default model: LoRA change {max_diff(unfused, base):.0f}/255, fused vs un-fused {max_diff(fused, unfused)}")
    assert max_diff(unfused, base) > VISIBLE
    assert max_diff(fused, unfused) <= 1
    for name, net in networks.items():
        after = net.state_dict()
        assert after.keys() == states[name].keys()
        assert all(torch.equal(after[k], v) for k, v in states[name].items()), name
    assert np.array_equal(np.asarray(pipe("a handwritten 7", **kwargs)[0], dtype=np.float64), unfused)
    pipe.unload_lora("x")
    assert np.array_equal(np.asarray(pipe("a handwritten 7", **kwargs)[0], dtype=np.float64), base)


# -- 4. never silent ---------------------------------------------------------------------------------------------------


def kohya_pairs(names: list[str], alpha: float = 2.0) -> dict[str, torch.Tensor]:
    """A valid rank-2 kohya pair for each to_q-sized (32 x 32) linear layer named."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for name in names:
        state[f"{name}.lora_down.weight"] = torch.randn(2, 32, generator=g) * 0.1
        state[f"{name}.lora_up.weight"] = torch.randn(32, 2, generator=g) * 0.1
        state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


GOOD = [f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{p}" for p in "qkv"]
BOGUS = [f"lora_unet_nowhere_block_{i}" for i in range(7)]


def assert_names_keys(message: str, keys: list[str], count: int) -> None:
    """The message gives the count and the first keys in order (SHOWN of them), not the rest."""
    assert f"{count} " in message, message
    for key in keys[: lora.SHOWN]:
        assert key in message, (key, message)
    for key in keys[lora.SHOWN :]:
        assert key not in message, (key, message)


def test_keys_matching_no_layer_refused_or_warned(fresh, tmp_path):
    path = tmp_path / "partly.safetensors"
    save_file(kohya_pairs(GOOD + BOGUS), str(path))
    unmatched = [f"unet: {name.removeprefix('lora_unet_')}" for name in BOGUS]
    with pytest.raises(ValueError, match="match no layer") as error:
        fresh.load_lora(path)
    assert_names_keys(str(error.value), unmatched, 7)
    assert "7 keys" in str(error.value) and "and 2 more" in str(error.value) and "strict=False" in str(error.value)
    assert fresh.loras == {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.load_lora(path, strict=False)
    warned = [w for w in caught if issubclass(w.category, lora.LoRAWarning)]
    assert len(warned) == 1
    assert_names_keys(str(warned[0].message), unmatched, 7)
    assert fresh.lora_info["partly"].layers == {"unet": 3}


def test_wrong_shape_refused_naming_the_layers(fresh, tmp_path):
    state = kohya_pairs(GOOD)
    wrong = [
        f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_{p}" for p in ("q", "k", "v", "out_0")
    ]
    wrong += ["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", "lora_unet_conv_in"]
    for name in wrong:
        state |= {f"{name}.lora_down.weight": torch.ones(2, 7), f"{name}.lora_up.weight": torch.ones(7, 2)}
    path = tmp_path / "shapes.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="6 layers have the wrong shape") as error:
        fresh.load_lora(path, strict=False)  # shape errors stay errors
    shown = sorted(f"unet: {n.removeprefix('lora_unet_')}" for n in wrong)
    assert_names_keys(str(error.value), shown, 6)
    assert "down (2, 7)" in str(error.value) and fresh.loras == {}


@pytest.mark.parametrize(
    "keys, match, count",
    [
        ([f"lora_unet_conv_in.hada_w{i}_{ab}" for i in (1, 2) for ab in "ab"] + ["lora_unet_conv_in.alpha"], "LoHa", 4),
        (["model.diffusion_model.x.weight", "first_stage_model.y.bias", "cond_stage.z"], "not understood", 3),
        ([f"unet.down_blocks.{i}.lora_magnitude_vector" for i in range(6)] + ["unet.a.lora_A.weight"], "DoRA", 6),
    ],
    ids=["loha", "random", "dora"],
)
def test_unknown_formats_refused_naming_the_keys(fresh, tmp_path, keys, match, count):
    path = tmp_path / "unknown.safetensors"
    save_file({k: torch.ones(2, 2) for k in keys}, str(path))
    with pytest.raises(ValueError, match=match) as error:
        fresh.load_lora(path)
    strange = sorted(k for k in keys if k != "lora_unet_conv_in.alpha" and "lora_A" not in k)
    assert_names_keys(str(error.value), strange, count)
    assert str(path) in str(error.value)


def test_missing_up_weights_named(fresh, tmp_path):
    names = [f"lora_unet_up_blocks_1_attentions_{i}_transformer_blocks_0_attn{a}_to_{p}"
             for i in (0, 1) for a in (1, 2) for p in "qk"][:6]  # fmt: skip
    state = {k: v for k, v in kohya_pairs(names + GOOD).items() if k.removesuffix(".lora_up.weight") not in names}
    path = tmp_path / "halves.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="6 layers are not a LoRA pair") as error:
        fresh.load_lora(path)
    assert_names_keys(str(error.value), sorted(names), 6)
    assert "has no up weight" in str(error.value) and "and 1 more" in str(error.value)
    state[f"{GOOD[0]}.alpha"] = torch.tensor(float("nan"))
    with pytest.raises(ValueError, match=r"alpha nan is not one finite number"):
        lora.parse_lora({k: v for k, v in state.items() if not k.startswith(tuple(names))})


def test_pickles_need_allow_pickle(sd, fresh, tmp_path):
    state = kohya_pairs(GOOD)
    save_file(state, str(tmp_path / "safe.safetensors"))
    fresh.unet.load_lora(tmp_path / "safe.safetensors")
    expected = unet_out(fresh.unet)
    fresh.unet.unload_lora()
    for suffix, content in ((".pt", state), (".ckpt", {"state_dict": state})):
        path = tmp_path / f"pickled{suffix}"
        torch.save(content, path)
        with pytest.raises(ValueError, match="allow_pickle=True") as error:
            fresh.load_lora(path)
        assert str(path) in str(error.value) and fresh.loras == {}
        assert fresh.load_lora(path, allow_pickle=True) == "pickled"
        assert fresh.lora_info["pickled"].layers == {"unet": 3}
        assert fresh.lora_info["pickled"].hash == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        assert torch.equal(unet_out(fresh.unet), expected)
        fresh.unload_lora()


def test_scale_and_name_errors(sd, fresh):
    a = sd["files"] / "a.safetensors"
    fresh.load_lora(a)
    with pytest.raises(ValueError, match=r"name='a' is already loaded; loaded: \['a'\]"):
        fresh.load_lora(a)
    with pytest.raises(ValueError, match=r"name='nope' is not loaded; loaded: \['a'\]"):
        fresh.set_lora_scales({"nope": 1.0})
    with pytest.raises(ValueError, match=r"name='nope' is not loaded"):
        fresh.unload_lora("nope")
    for bad in (float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match=r"scale of adapter 'a'=.* is not allowed; allowed: a finite number"):
            fresh.set_lora_scales({"a": bad})
        with pytest.raises(ValueError, match=r"scale of adapter 'b'=.* is not allowed; allowed: a finite number"):
            fresh.load_lora(sd["files"] / "b_kohya.safetensors", bad, name="b")
        with pytest.raises(ValueError, match=r"loras\['a'\]=.* is not allowed; expected a finite number"):
            fresh(PROMPT, steps=1, loras={"a": bad})
    assert fresh.loras == {"a": 1.0} and lora.loaded(fresh.unet) == {"a": 1.0}
    with pytest.raises(
        ValueError, match=r"loras=\{'nope': 1\} is not allowed; 'nope' is not a known LoRA; available: a"
    ):
        fresh(PROMPT, steps=1, loras={"nope": 1})
    with pytest.raises(ValueError, match=r"loras=\{'nope': 1\} is not allowed"):
        fresh.generate([Request(PROMPT, steps=1, loras={"nope": 1})])


def test_changing_adapters_while_fused_refused(sd, fresh):
    fresh.load_lora(sd["files"] / "a.safetensors", 0.5)
    fresh.fuse_lora()
    with pytest.raises(ValueError, match="cannot change LoRA scales while fused; call unfuse_lora"):
        fresh.set_lora_scales({"a": 1.0})
    with pytest.raises(ValueError, match="while LoRAs are fused; call unfuse_lora"):
        fresh.load_lora(sd["files"] / "b_kohya.safetensors")
    with pytest.raises(ValueError, match=r"loras=\{'a': 1.0\} differ from the fused adapters \{'a': 0.5\}"):
        fresh(PROMPT, steps=1, loras={"a": 1.0})
    fresh.set_lora_scales({"a": 0.5})  # unchanged: allowed
    assert fresh.loras == {"a": 0.5}
    fresh.unfuse_lora()
    fresh.set_lora_scales({"a": 1.0})
    assert lora.loaded(fresh.text_encoder.lora_root()) == {"a": 1.0}


# -- 5. the library API on the networks --------------------------------------------------------------------------------


def test_network_load_lora_takes_its_own_part(sd, tmp_path):
    a = sd["files"] / "a.safetensors"
    whole, part = Pipeline.from_pretrained(sd["folder"]), Pipeline.from_pretrained(sd["folder"])
    base_unet, base_text = unet_out(part.unet), part.text_encoder.encode([PROMPT]).hidden_states
    whole.load_lora(a, 0.6)
    info = part.unet.load_lora(a, 0.6)
    assert info.layers == {"unet": 52} and info.name == "a" and info.format == "diffusers"
    assert part.unet.loras == {"a": 0.6} and part.text_encoder.loras == {}
    assert torch.equal(unet_out(part.unet), unet_out(whole.unet))
    assert (unet_out(part.unet) - base_unet).abs().max() > 0.1
    assert torch.equal(part.text_encoder.encode([PROMPT]).hidden_states, base_text)
    info = part.text_encoder.load_lora(a, 0.6)
    assert info.layers == {"text_encoder": 12} and part.text_encoder.loras == {"a": 0.6}
    assert torch.equal(
        part.text_encoder.encode([PROMPT]).hidden_states, whole.text_encoder.encode([PROMPT]).hidden_states
    )
    unet_only = tmp_path / "unet_only.safetensors"
    save_file(kohya_pairs(GOOD), str(unet_only))
    with pytest.raises(ValueError, match=r"has no layers for the text_encoder \(it has: \['unet'\]\)"):
        part.text_encoder.load_lora(unet_only)
    part.unet.set_lora_scales({"a": 0.0})
    assert torch.equal(unet_out(part.unet), base_unet)
    assert part.unet.unload_lora() == ["a"] and part.text_encoder.unload_lora("a") == ["a"]
    assert torch.equal(unet_out(part.unet), base_unet)
    assert torch.equal(part.text_encoder.encode([PROMPT]).hidden_states, base_text)
    part.unet.set_lora_scales({})  # nothing loaded, nothing asked: a no-op


def test_stacking_is_order_insensitive(sd):
    files = sd["files"]
    one, two = Pipeline.from_pretrained(sd["folder"]), Pipeline.from_pretrained(sd["folder"])
    one.load_lora(files / "a.safetensors", 0.7)
    one.load_lora(files / "b_kohya.safetensors", -0.5)
    two.load_lora(files / "b_kohya.safetensors", -0.5)
    two.load_lora(files / "a.safetensors", 0.7)
    assert one.loras == {"a": 0.7, "b_kohya": -0.5} and two.loras == {"b_kohya": -0.5, "a": 0.7}
    first, second = unet_out(one.unet), unet_out(two.unet)
    torch.testing.assert_close(first, second, atol=1e-5 * first.abs().max().item(), rtol=0)
    one.set_lora_scales({"b_kohya": 0.0})
    assert (unet_out(one.unet) - first).abs().max() > 0.1  # b counted
    embedding = one.text_encoder.encode([PROMPT]).hidden_states
    one.set_lora_scales({"b_kohya": -0.5})
    torch.testing.assert_close(
        one.text_encoder.encode([PROMPT]).hidden_states, two.text_encoder.encode([PROMPT]).hidden_states
    )
    assert (one.text_encoder.encode([PROMPT]).hidden_states - embedding).abs().max() > 0.1


def test_request_loras_run_exactly_those(sd, fresh):
    files = sd["files"]
    fresh.load_lora(files / "a.safetensors", 1.0)
    fresh.load_lora(files / "b_kohya.safetensors", 1.0)
    [image] = fresh(PROMPT, steps=6, seed=0, latents=latents(), loras={"a": 0.5}, **CALL)
    assert fresh.loras == {"a": 1.0, "b_kohya": 1.0}  # the request's scales were its own
    set_scales(fresh, {"a": 0.5})
    assert np.array_equal(np.asarray(image, dtype=np.float64), our_image(fresh))
    set_scales(fresh, {"a": 1.0, "b_kohya": 1.0})
    assert max_diff(np.asarray(image, dtype=np.float64), our_image(fresh)) > VISIBLE
    parameters = image.info["parameters"]
    data = (files / "a.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")
    short_hash = hashlib.sha256(data[8 + header :]).hexdigest()[:12]  # AUTOMATIC1111's addnet hash, 12 digits
    assert lora.lora_hash(files / "a.safetensors") == short_hash
    assert parameters.splitlines()[0] == f"{PROMPT} <lora:a:0.5>"
    assert f'Lora hashes: "a: {short_hash}"' in parameters and "b_kohya" not in parameters
    parsed = parse_parameters(parameters)
    assert parsed["prompt"] == PROMPT and parsed["loras"] == {"a": 0.5} and parsed["lora_hashes"] == {"a": short_hash}
    [none] = fresh(PROMPT, steps=6, seed=0, latents=latents(), loras={}, **CALL)
    set_scales(fresh, {})
    assert np.array_equal(np.asarray(none, dtype=np.float64), our_image(fresh))
    assert "<lora:" not in none.info["parameters"] and "Lora hashes" not in none.info["parameters"]


def test_network_level_adapters_keep_their_scales_in_pipeline_calls(sd, fresh):
    """An adapter loaded on the U-Net itself is the caller's: the pipeline's requests neither switch it off nor on."""
    base = our_image(fresh)
    fresh.unet.load_lora(sd["files"] / "a.safetensors", 1.0)
    assert fresh.loras == {} and fresh.unet.loras == {"a": 1.0}
    with_unet_lora = our_image(fresh)
    assert max_diff(with_unet_lora, base) > VISIBLE
    assert np.array_equal(our_image(fresh, loras={}), with_unet_lora)
    fresh.load_lora(sd["files"] / "b_kohya.safetensors", 1.0)
    assert np.array_equal(our_image(fresh, loras={}), with_unet_lora)
    assert fresh.unet.loras == {"a": 1.0, "b_kohya": 1.0}


def test_add_lora_attaches_to_all_networks_or_none(sd, fresh):
    file = lora.read_lora(sd["files"] / "a.safetensors")
    adapter = lora.adapter_from_file(file, {"unet": fresh.unet, "text_encoder": fresh.text_encoder.lora_root()})
    fresh.text_encoder.load_lora(sd["files"] / "a.safetensors", name="taken")  # the second network refuses "taken"
    with pytest.raises(ValueError, match="taken"):
        fresh.add_lora(adapter, "taken")
    assert fresh.loras == {} and fresh.unet.loras == {} and fresh.text_encoder.loras == {"taken": 1.0}


def test_lora_hash_takes_kohyas_recorded_hash(tmp_path):
    path = tmp_path / "trained.safetensors"
    save_file(kohya_pairs(GOOD), str(path), metadata={"sshs_model_hash": "0123456789abcdef0123"})
    assert lora.lora_hash(path) == "0123456789ab"
    plain = tmp_path / "plain.safetensors"
    save_file(kohya_pairs(GOOD), str(plain), metadata={"ss_network_dim": "2"})
    data = plain.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert json.loads(data[8 : 8 + header])["__metadata__"] == {"ss_network_dim": "2"}
    assert lora.lora_hash(plain) == hashlib.sha256(data[8 + header :]).hexdigest()[:12]


def test_empty_prompt_cache_follows_text_encoder_scales(sd, fresh):
    text = fresh.text_encoder
    base = text.empty().hidden_states.clone()
    fresh.load_lora(sd["files"] / "a.safetensors", 0.0)
    assert torch.equal(text.empty().hidden_states, base)
    fresh.set_lora_scales({"a": 0.5})
    half = text.empty().hidden_states.clone()
    assert (half - base).abs().max() > 0.1
    torch.testing.assert_close(half, text.encode([""]).hidden_states, atol=0, rtol=0)
    fresh.set_lora_scales({"a": 1.0})
    assert (text.empty().hidden_states - half).abs().max() > 0.1
    fresh.set_lora_scales({"a": 0.0})
    assert torch.equal(text.empty().hidden_states, base)
    fresh.set_lora_scales({"a": 0.5})
    with lora.lora_disabled():
        assert torch.equal(text.empty().hidden_states, base)
    assert torch.equal(text.empty().hidden_states, half)


def test_lora_disabled_is_thread_local(sd, fresh):
    """Inside ``lora_disabled`` on one thread the base networks run there, while a generation on another thread at
    the same time keeps its LoRA."""
    fresh.load_lora(sd["files"] / "a.safetensors", 1.0)
    with_lora = unet_out(fresh.unet)
    with lora.lora_disabled():
        base = unet_out(fresh.unet)
    assert (with_lora - base).abs().max() > 0.1
    expected = our_image(fresh)
    inside, done = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def filter_thread():  # as the safety filter: the base text encoder and U-Net while the other thread generates
        with lora.lora_disabled():
            inside.set()
            done.wait(timeout=60)
            results["filter"] = unet_out(fresh.unet)

    def generate_thread():
        inside.wait(timeout=60)
        results["image"] = our_image(fresh)
        results["unet"] = unet_out(fresh.unet)
        done.set()

    threads = [threading.Thread(target=filter_thread), threading.Thread(target=generate_thread)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert np.array_equal(results["image"], expected)
    assert torch.equal(results["unet"], with_lora)
    assert torch.equal(results["filter"], base)
    assert torch.equal(unet_out(fresh.unet), with_lora)  # this thread was never disabled


def test_lora_disabled_also_undoes_fused_adapters(sd, fresh):
    """Fused, the weights hold the updates: inside ``lora_disabled`` the hooks take them out again (fp32 rounding)."""
    text = fresh.text_encoder
    base_unet, base_text, base_empty = unet_out(fresh.unet), text.encode([PROMPT]).hidden_states, text.empty()
    fresh.load_lora(sd["files"] / "a.safetensors", 0.8)
    fresh.load_lora(sd["files"] / "b_kohya.safetensors", 0.5)
    set_upsample_fusion(fresh.unet, True)  # the fused upsampler must still run its conv's hook
    unfused = unet_out(fresh.unet)
    fresh.fuse_lora()
    fused_unet, fused_text = unet_out(fresh.unet), text.encode([PROMPT]).hidden_states
    torch.testing.assert_close(fused_unet, unfused, atol=1e-5 * unfused.abs().max().item(), rtol=0)
    assert (fused_unet - base_unet).abs().max() > 0.1 and (fused_text - base_text).abs().max() > 0.1
    with lora.lora_disabled():
        torch.testing.assert_close(unet_out(fresh.unet), base_unet, atol=1e-5 * base_unet.abs().max().item(), rtol=0)
        torch.testing.assert_close(text.encode([PROMPT]).hidden_states, base_text, atol=1e-5, rtol=0)
        torch.testing.assert_close(text.empty().hidden_states, base_empty.hidden_states, atol=1e-5, rtol=0)
    assert (text.empty().hidden_states - base_empty.hidden_states).abs().max() > 0.1
    assert torch.equal(unet_out(fresh.unet), fused_unet)
