"""Single-file Stable Diffusion checkpoints in the original CompVis/Stability layout (SD 1.x, 2.x, SDXL, inpainting):
what a file is, and the configs and tokenizers it lacks.

One file holds the U-Net (``model.diffusion_model.``), the VAE (``first_stage_model.``) and the text encoders
(``Tower``): CLIP ViT-L in transformers' layout for SD 1.x (``cond_stage_model.transformer.``), OpenCLIP ViT-H for
SD 2.x (``cond_stage_model.model.``); Stability's sgm layout for SDXL (``conditioner.embedders.N.``: CLIP ViT-L, then
OpenCLIP ViT-bigG with its text projection; the refiner has bigG alone). ``detect_family`` and ``detect_prediction``
say what a file is; keys real files carry beside the networks are recognised (``SKIPPED_KEYS``, EMA copies, SD 2.x's
unused last text layer) and ``check_keys`` makes any other unknown or missing key one error that names the file.
The key mappings are in ``unnoise.models.single_file_keys``, the reading in ``unnoise.models.tensor_files``.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unnoise.models.single_file_keys import LDM_UNET, REFINER_BIGG, SD1_TEXT, SD2_TEXT, SDXL_BIGG, SDXL_CLIP
from unnoise.models.tensor_files import Checkpoint

FAMILY_CONFIGS = Path(__file__).resolve().parent.parent / "weights" / "families"
CLIP_MERGES = FAMILY_CONFIGS / "clip" / "merges.txt.gz"


@dataclasses.dataclass(frozen=True)
class Tower:
    """A text encoder in a single file: the pipeline component it is (``text_encoder`` or ``text_encoder_2``), the
    prefix of its keys, and their layout: OpenCLIP's or transformers'."""

    component: str
    prefix: str
    openclip: bool


_SD1 = (Tower("text_encoder", SD1_TEXT, openclip=False),)
_SD2 = (Tower("text_encoder", SD2_TEXT, openclip=True),)
_SDXL = (Tower("text_encoder", SDXL_CLIP, openclip=False), Tower("text_encoder_2", SDXL_BIGG, openclip=True))
_REFINER = (Tower("text_encoder_2", REFINER_BIGG, openclip=True),)


@dataclasses.dataclass(frozen=True)
class Family:
    """A kind of single file: ``configs`` names its shipped config folder (``weights/families/``), ``towers`` its
    text encoders (the last one's key prefix tells the family apart), ``pipeline`` diffusers' pipeline class."""

    name: str
    title: str
    configs: str
    towers: tuple[Tower, ...]
    pipeline: str
    inpainting: bool = False

    @property
    def sd2(self) -> bool:
        """SD 2.x: conditioned on OpenCLIP ViT-H's penultimate layer, whose last layer its files still hold."""
        return self.towers == _SD2

    @property
    def sdxl(self) -> bool:
        return self.towers[-1].component == "text_encoder_2"


_SD, _SD_INPAINT = "StableDiffusionPipeline", "StableDiffusionInpaintPipeline"
FAMILIES = {
    f.name: f
    for f in (
        Family("sd1", "Stable Diffusion 1.x", "sd1", _SD1, _SD),
        Family("sd1-inpainting", "Stable Diffusion 1.x inpainting", "sd1", _SD1, _SD_INPAINT, inpainting=True),
        Family("sd2", "Stable Diffusion 2.x", "sd2", _SD2, _SD),
        Family("sd2-inpainting", "Stable Diffusion 2.x inpainting", "sd2", _SD2, _SD_INPAINT, inpainting=True),
        Family("sdxl-base", "Stable Diffusion XL base", "sdxl-base", _SDXL, "StableDiffusionXLPipeline"),
        Family(
            "sdxl-inpainting",
            "Stable Diffusion XL inpainting",
            "sdxl-base",
            _SDXL,
            "StableDiffusionXLInpaintPipeline",
            inpainting=True,
        ),  # fmt: skip
        Family(
            "sdxl-refiner", "Stable Diffusion XL refiner", "sdxl-refiner", _REFINER, "StableDiffusionXLImg2ImgPipeline"
        ),
    )
}
# Other kinds of checkpoint, by a key prefix only they have, so that the error names them.
_OTHERS = (
    ("control_model.", "ControlNet"),
    ("depth_model.", "Stable Diffusion 2 depth-to-image"),
    ("model.diffusion_model.joint_blocks.", "Stable Diffusion 3"),
    ("model.diffusion_model.double_blocks.", "Flux"),
)

# Keys real files carry beside the networks: LatentDiffusion's noise-schedule buffers (sgm's ``denoiser.sigmas``), the
# EMA's counters, OpenCLIP's contrastive head (SD 2.x also the text projection it does not use), transformers'
# constant position ids and ComfyUI's v-prediction marker.
SKIPPED_KEYS = frozenset(
    {
        *("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"),
        *("log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "logvar"),
        *("posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"),
        *("model_ema.decay", "model_ema.num_updates", SD2_TEXT + "logit_scale", SD2_TEXT + "text_projection"),
        *(SD1_TEXT + "text_model.embeddings.position_ids", SD1_TEXT + "embeddings.position_ids", "v_pred"),
        *(SDXL_CLIP + "text_model.embeddings.position_ids", SDXL_BIGG + "logit_scale", REFINER_BIGG + "logit_scale"),
        "denoiser.sigmas",
    }
)
EMA = "model_ema."
V_STATISTIC = 0.09  # ComfyUI's threshold on the std of the last output block's norm1.bias (supported_models.SD20)
SD2_BASE_STEP = 875000  # global_step of SD 2.0 512-base, the one SD 2.x checkpoint diffusers knows as epsilon


# -- what a file is ---------------------------------------------------------------------------------------------------


SUPPORTED = "Stable Diffusion 1.x, 2.x, their inpainting variants, SDXL base (and inpainting) and SDXL refiner"


def detect_family(ckpt: Checkpoint) -> Family:
    """The family from the keys: the last text encoder's prefix (SDXL's bigG, else SD 2.x's OpenCLIP, else SD 1.x's
    CLIP), then the U-Net's input channels (9: inpainting)."""
    keys = ckpt.keys
    for prefix, title in _OTHERS:
        if any(k.startswith(prefix) for k in keys):
            raise ValueError(
                f"{ckpt.path} is a {title} checkpoint (keys {prefix}...), which is not supported; supported single "
                f"files: {SUPPORTED}"
            )
    prefixes = {f.towers[-1].prefix: f for f in reversed(FAMILIES.values()) if not f.inpainting}  # SDXL first
    family = next((f for prefix, f in prefixes.items() if any(k.startswith(prefix) for k in keys)), None)
    if family is None:
        raise ValueError(
            f"{ckpt.path}: unknown family: no Stable Diffusion text encoder (keys {' or '.join(prefixes)}...); "
            f"{_first(keys)}"
        )
    conv_in = LDM_UNET + "input_blocks.0.0.weight"
    if conv_in not in keys:
        raise ValueError(f"{ckpt.path}: no U-Net input convolution {conv_in!r}; {_first(keys)}")
    channels = ckpt.shape(conv_in)[1]
    inpainting = next((f for f in FAMILIES.values() if f.inpainting and f.towers == family.towers), None)
    if channels == 4 or (channels == 9 and inpainting is not None):
        return family if channels == 4 else inpainting
    allowed = "4 (text-to-image) or 9 (inpainting)" if inpainting is not None else "4"
    raise ValueError(
        f"{ckpt.path}: a {family.title} U-Net with {channels} input channels (InstructPix2Pix has 8) is not "
        f"supported; allowed: {allowed}"
    )


def _first(keys: list[str], n: int = 5) -> str:
    return f"its first keys: {sorted(keys)[:n]} ({len(keys)} keys)"


# ``modelspec.prediction_type`` values (the model spec writes "epsilon" or "v"; unnoise also "sample") -> ours.
_SPEC_NAMES = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
_SPEC_NAMES["sample"] = "sample"


def detect_prediction(ckpt: Checkpoint, family: Family) -> tuple[str, str]:
    """(prediction type, why) from the file alone: its ``modelspec.prediction_type`` metadata, ComfyUI's ``v_pred``
    marker key, SD 2.0 512-base's ``global_step`` (diffusers), else ComfyUI's weight statistic for SD 2.x text-to-image:
    the std of the last output block's first ``norm1.bias`` above 0.09 means v-prediction (768-v); other families are
    epsilon-prediction."""
    spec = ckpt.metadata.get("modelspec.prediction_type")
    if spec is not None:
        if spec.lower() not in _SPEC_NAMES:
            raise ValueError(
                f"{ckpt.path}: metadata modelspec.prediction_type={spec!r}; allowed: {sorted(_SPEC_NAMES)}"
            )
        return _SPEC_NAMES[spec.lower()], f"the file's metadata modelspec.prediction_type={spec!r}"
    if "v_pred" in ckpt.keys:
        return "v_prediction", "the file's v_pred key (ComfyUI's marker)"
    if family.name != "sd2":
        return "epsilon", f"{family.title} is epsilon-prediction"
    if ckpt.global_step == SD2_BASE_STEP:
        return "epsilon", f"global_step={SD2_BASE_STEP} is SD 2.0 512-base (diffusers' rule)"
    pattern = re.compile(re.escape(LDM_UNET) + r"output_blocks\.(\d+)\.1\.transformer_blocks\.0\.norm1\.bias")
    found = sorted((int(m[1]), k) for k in ckpt.keys if (m := pattern.fullmatch(k)))
    if not found:
        return "epsilon", "no output-block attention to measure"
    key = found[-1][1]
    std = ckpt.get(key).float().std(unbiased=False).item()
    kind = "v_prediction" if std > V_STATISTIC else "epsilon"
    return kind, f"std of {key} = {std:.4f} {'>' if std > V_STATISTIC else '<='} {V_STATISTIC} (ComfyUI's rule)"


def check_keys(ckpt: Checkpoint, used: set[str], skipped: Callable[[str], bool], hint: str) -> None:
    """Every key of the file is used or recognised, and every used key is there; else one error naming both."""
    have = set(ckpt.keys)
    unknown = sorted(k for k in have - used if not skipped(k))
    missing = sorted(used - have)
    problems = [
        f"{len(v)} {what} keys: {v[:5]}{' ...' if len(v) > 5 else ''}"
        for what, v in (("unknown", unknown), ("missing", missing))
        if v
    ]
    if problems:
        raise ValueError(f"{ckpt.path}: {'; '.join(problems)}; {hint}")


def ema_key(ldm: str) -> str:
    """The EMA copy of a U-Net key: ``model_ema.`` and the key after ``model.`` with its dots dropped."""
    return EMA + ldm.removeprefix("model.").replace(".", "")


# -- CLIP's tokenizer ---------------------------------------------------------------------------------------------


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of bytes to printable characters, which CLIP's BPE works on."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@functools.cache
def _clip_merge_parts() -> tuple[list[str], list[str]]:
    """CLIP's BPE merges in rank order (after the "#version: 0.2" line) as two lists, the first and the second part
    of each, read once per process: no BPE token holds white space, so one split of the file gives them all."""
    parts = gzip.decompress(CLIP_MERGES.read_bytes()).decode("utf-8").partition("\n")[2].split()
    return parts[::2], parts[1::2]


def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merges ("first second"), built from the shipped merges as OpenAI's ``SimpleTokenizer``
    builds them."""
    vocab, (first, second) = _clip_vocab(), _clip_merge_parts()
    return vocab, [f"{a} {b}" for a, b in zip(first, second, strict=True)]


def _clip_vocab() -> dict[str, int]:
    """The bytes' characters, the same with "</w>" (a word's end), each merge's token, then the two special tokens."""
    chars = list(_bytes_to_unicode().values())
    first, second = _clip_merge_parts()
    tokens = [*chars, *(c + "</w>" for c in chars), *map(str.__add__, first, second)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return dict(zip(tokens, range(len(tokens)), strict=True))


def write_clip_tokenizer(folder: Path, family: Family, tokenizer: str = "tokenizer") -> None:
    """The family's CLIP tokenizer ``tokenizer`` (SDXL: also ``tokenizer_2``, which pads with "!") as a diffusers
    folder: vocab.json, merges.txt and its configs."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((FAMILY_CONFIGS / family.configs / tokenizer / name).read_bytes())


def clip_tokenizer(family: Family, tokenizer: str = "tokenizer") -> Any:
    """transformers' CLIPTokenizer ``tokenizer`` of the family, built in memory (transformers >= 5; else from a
    written folder)."""
    import transformers  # the caller has checked it is installed (text.import_transformers)

    folder = FAMILY_CONFIGS / family.configs / tokenizer
    options = json.loads((folder / "tokenizer_config.json").read_text())
    options.pop("tokenizer_class", None)
    try:
        merges = list(zip(*_clip_merge_parts(), strict=True))
        return transformers.CLIPTokenizer(vocab=_clip_vocab(), merges=merges, **options)
    except TypeError:  # transformers 4: files only
        with tempfile.TemporaryDirectory() as tmp:
            write_clip_tokenizer(Path(tmp), family, tokenizer)
            return transformers.CLIPTokenizer.from_pretrained(tmp, local_files_only=True)
