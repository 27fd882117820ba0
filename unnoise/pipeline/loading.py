"""Loading, saving and converting pipelines: our ``pipeline.json`` folders, diffusers Stable Diffusion folders and
single files in the original CompVis/Stability layout (``unnoise.models.single_file``).

Our format is a folder with ``pipeline.json`` (``PipelineConfig``), ``unet/`` and ``vae/`` in our model format
(``unnoise.models.io``) and, for a CLIP text encoder, diffusers-style ``text_encoder/`` and ``tokenizer/`` folders.
The bundled MiniLM encoder is not copied: it loads from its package. A single file lacks every config: they come
from a ``config=`` folder (either layout; parts it lacks too come from the family) or from the family's configs
shipped in ``unnoise/weights/families/``. ``convert`` moves a pipeline between the three layouts tensor by tensor,
bit for bit unless a dtype is asked for.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from unnoise.core.denoisers import PREDICTIONS
from unnoise.core.samplers import SAMPLER_INFO
from unnoise.core.schedules import check_choice
from unnoise.models import single_file as sf
from unnoise.models.io import diffusers_key, load_diffusers, load_model, parse_config, read_json, save_model
from unnoise.models.text import (
    CLIPTextEncoder,
    DualCLIPTextEncoder,
    MiniLMEncoder,
    TextEncoder,
    import_transformers,
    quiet_transformers,
)
from unnoise.models.unet import UNet, UNetConfig
from unnoise.models.vae import AutoencoderKL, AutoencoderKLConfig
from unnoise.pipeline.config import PipelineConfig, TextEncoderConfig
from unnoise.pipeline.schedulers import SCHEDULERS, translate_scheduler

LOG = logging.getLogger("unnoise.loading")
# The embedded default model, shipped as package data: MNIST text-to-image (configs/mnist-*.toml made it).
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "mnist-ldm"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
LAYOUTS = ("diffusers", "single-file", "unnoise")


@dataclasses.dataclass(frozen=True)
class SingleFileInfo:
    """What a single file was detected to be and how its prediction type was decided (logged; for PNG parameters)."""

    family: str
    prediction: str
    prediction_source: str
    ema: bool = False


@dataclasses.dataclass
class Components:
    """What a pipeline folder holds, loaded; ``unet_weights`` is the file whose hash names the model (a single file:
    the whole file, as AUTOMATIC1111 hashes it); ``single_file`` says what a single file was detected to be."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: TextEncoder
    config: PipelineConfig
    unet_weights: Path | None
    single_file: SingleFileInfo | None = None


def resolve_model(path: str | Path) -> Path:
    """A model: ``"default"`` is the embedded default model (package data), a ``.safetensors``/``.ckpt`` file a single
    file, anything else a folder; a FileNotFoundError names what is missing when it is none of these."""
    if str(path) == "default":
        if not (DEFAULT_MODEL / "pipeline.json").is_file():
            raise FileNotFoundError(
                f"the embedded default model is missing from {DEFAULT_MODEL}; reinstall unnoise (or run `make "
                "default-model` in a source checkout), or pass --model DIR, a diffusers Stable Diffusion folder or an "
                "unnoise pipeline folder"
            )
        return DEFAULT_MODEL
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise FileNotFoundError(
                f"{path} is a file but not a single-file checkpoint; allowed: {', '.join(SINGLE_FILE_SUFFIXES)}"
            )
        return path
    folder = _require_folder(path)
    if not any((folder / name).is_file() for name in ("pipeline.json", "model_index.json")):
        raise FileNotFoundError(f"{folder} holds neither pipeline.json (our format) nor model_index.json (diffusers)")
    return folder


def load_components(path: str | Path) -> Components:
    """Load our folder (``pipeline.json``), a diffusers Stable Diffusion folder (``model_index.json``), a single file
    (``load_single_file`` with its defaults) or "default".

    Errors name the file and what is wrong: FileNotFoundError for a missing one, ValueError for an unreadable one.
    """
    found = resolve_model(path)
    if found.is_file():
        return load_single_file(found)
    return _load_ours(found) if (found / "pipeline.json").is_file() else _load_diffusers(found)


def _load_ours(folder: Path) -> Components:
    path = folder / "pipeline.json"
    config = parse_config(path, PipelineConfig.from_dict, read_json(path))
    te = config.text_encoder
    text_encoder: TextEncoder | DualCLIPTextEncoder
    if te.kind == "minilm":
        text_encoder = MiniLMEncoder.from_package(max_length=te.max_length)
    elif te.kind == "sdxl":
        text_encoder = _dual_clip(folder, with_first=(folder / "text_encoder").is_dir(), clip_skip=te.clip_skip)
    else:
        text_encoder = _clip(folder / "text_encoder", folder / "tokenizer", clip_skip=te.clip_skip)
    unet, vae = load_model(folder / "unet"), load_model(folder / "vae")
    return Components(unet, vae, text_encoder, config, folder / "unet" / "model.safetensors")


# The components a diffusers Stable Diffusion folder lists in model_index.json, each as [library, class].
_DIFFUSERS_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


def _listed(index: dict[str, Any], name: str) -> str | None:
    """The class model_index.json lists for component ``name`` ([library, class]); None where it lists none."""
    entry = index.get(name)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[0] is not None else None


def _check_model_index(folder: Path, *, sdxl: bool = False) -> dict[str, Any]:
    """model_index.json of a Stable Diffusion 1.x/2.x folder or, with ``sdxl``, also of an SDXL one (CLIP-L and
    OpenCLIP-bigG with its projection; the refiner lists bigG alone); other text-encoder sets are refused, naming
    them."""
    path = folder / "model_index.json"
    index = read_json(path)
    first, second = _listed(index, "text_encoder"), _listed(index, "text_encoder_2")
    if sdxl and second == "CLIPTextModelWithProjection" and first in ("CLIPTextModel", None):
        needed = ("unet", "vae", "scheduler", "text_encoder_2", "tokenizer_2", *(("tokenizer",) if first else ()))
    elif second is None and first == "CLIPTextModel":
        needed = _DIFFUSERS_COMPONENTS
    else:
        allowed = "Stable Diffusion 1.x/2.x (one CLIPTextModel)"
        allowed += " or SDXL (CLIPTextModel and CLIPTextModelWithProjection)" if sdxl else ""
        raise ValueError(
            f"{folder}: {index.get('_class_name')} with text encoders {first!r} and {second!r} is not supported "
            f"here; allowed: {allowed}"
        )
    missing = [name for name in needed if _listed(index, name) is None]
    if missing:
        raise ValueError(
            f"{path}: components {missing} are missing; this folder needs each of {list(needed)} as [library, class]"
        )
    return index


def _load_diffusers(folder: Path) -> Components:
    index = _check_model_index(folder, sdxl=True)
    sdxl = _listed(index, "text_encoder_2") is not None
    path = folder / "scheduler" / "scheduler_config.json"
    schedule, prediction, sampling = parse_config(path, translate_scheduler, read_json(path))
    zeros = _force_zeros(index, sdxl)
    config = PipelineConfig(
        text_encoder=TextEncoderConfig(kind="sdxl" if sdxl else "clip", force_zeros_for_empty_prompt=zeros),
        prediction=prediction,
        schedule=schedule,
        sampling=sampling,
    )
    text_encoder: TextEncoder | DualCLIPTextEncoder
    if sdxl:
        text_encoder = _dual_clip(folder, with_first=_listed(index, "text_encoder") is not None)
    else:
        text_encoder = _clip(folder / "text_encoder", folder / "tokenizer")
    unet, vae = load_diffusers(folder / "unet"), load_diffusers(folder / "vae")
    names = (*_DIFFUSERS_WEIGHTS, "diffusion_pytorch_model.bin")
    weights = next((folder / "unet" / n for n in names if (folder / "unet" / n).is_file()), None)
    return Components(unet, vae, text_encoder, config, weights)


def _force_zeros(index: dict[str, Any], sdxl: bool) -> bool:
    """SDXL's ``force_zeros_for_empty_prompt`` from a diffusers model_index.json (diffusers' default: on)."""
    return sdxl and bool(index.get("force_zeros_for_empty_prompt", True))


def _dual_clip(folder: Path, *, with_first: bool, clip_skip: int = 0) -> DualCLIPTextEncoder:
    """SDXL's two text towers from ``text_encoder(_2)/`` and ``tokenizer(_2)/`` (the refiner has bigG alone)."""
    first = None
    if with_first:
        first = _clip(folder / "text_encoder", folder / "tokenizer", clip_skip=clip_skip, penultimate=True)
    second = _clip(folder / "text_encoder_2", folder / "tokenizer_2", clip_skip=clip_skip, penultimate=True)
    return DualCLIPTextEncoder(first, second)


def _clip(text_encoder: Path, tokenizer: Path, *, clip_skip: int = 0, penultimate: bool = False) -> CLIPTextEncoder:
    """The CLIP text encoder of diffusers-style folders; a missing folder or unreadable weights named (as
    transformers does not)."""
    _require_folder(text_encoder)
    if not _has_tokenizer(_require_folder(tokenizer)):
        raise FileNotFoundError(f"{tokenizer} holds neither tokenizer.json nor vocab.json")
    try:
        return CLIPTextEncoder.from_folder(text_encoder, tokenizer, clip_skip=clip_skip, penultimate=penultimate)
    except SafetensorError as error:
        raise ValueError(f"{text_encoder}: its weights are not a readable safetensors file: {error}") from error


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json"))


def _require_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist" if not folder.exists() else f"{folder} is not a folder")
    return folder


def save_components(path: str | Path, parts: Components) -> None:
    """Write our format: ``pipeline.json``, ``unet/``, ``vae/`` and, for CLIP, ``text_encoder/`` and ``tokenizer/``
    (SDXL: also ``text_encoder_2/`` and ``tokenizer_2/``)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(parts.unet, folder / "unet")
    save_model(parts.vae, folder / "vae")
    if parts.config.text_encoder.kind == "clip":
        parts.text_encoder.model.save_pretrained(folder / "text_encoder", safe_serialization=True)
        parts.text_encoder.tokenizer.save_pretrained(folder / "tokenizer")
    if parts.config.text_encoder.kind == "sdxl":
        for encoder, suffix in ((parts.text_encoder.first, ""), (parts.text_encoder.second, "_2")):
            if encoder is not None:  # the refiner has no first
                encoder.model.save_pretrained(folder / f"text_encoder{suffix}", safe_serialization=True)
                encoder.tokenizer.save_pretrained(folder / f"tokenizer{suffix}")
    text = json.dumps(parts.config.to_dict(), indent=2, sort_keys=True) + "\n"
    (folder / "pipeline.json").write_text(text)


# -- any layout, read lazily ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Configs:
    """A pipeline's configs from any layout; ``prediction_source`` is None where the source does not say."""

    unet: UNetConfig
    vae: AutoencoderKLConfig
    texts: dict[str, dict[str, Any]]  # per text encoder (text_encoder, text_encoder_2): transformers' config as JSON
    tokenizers: dict[str, Path | None]  # per text encoder: its tokenizer folder to copy; None: the family's shipped one
    config: PipelineConfig
    prediction_source: str | None
    diffusers: dict[str, dict[str, Any]]  # the source's own diffusers configs, written back as they are
    origin: dict[str, Path]  # the folder each part came from


@dataclasses.dataclass
class _Layout:
    """A pipeline in any of the three layouts: configs, and tensors under our names read on demand."""

    family: sf.Family
    configs: _Configs
    nets: dict[str, torch.nn.Module]  # "unet", "vae" and the text encoders on the meta device (``_networks``)
    tensors: dict[str, dict[str, sf.Lazy]]  # the same networks', under our names
    files: list[sf.Checkpoint]
    info: SingleFileInfo | None = None

    def close(self) -> None:
        for file in self.files:
            file.close()


_TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}  # each text encoder's tokenizer


def _read_configs(folders: list[Path], towers: tuple[str, ...]) -> _Configs:
    """Each config from the first of ``folders`` that has it: ``unet/``, ``vae/``, the text encoders ``towers`` and
    their tokenizers (either layout), then ``pipeline.json`` (ours) or ``scheduler/`` (diffusers; SDXL's
    ``force_zeros_for_empty_prompt`` from the same folder's ``model_index.json``)."""
    origin = {}
    for part in ("unet", "vae", *towers):
        found = next((f for f in folders if (f / part / "config.json").is_file()), None)
        if found is None:
            raise FileNotFoundError(f"no {part}/config.json in {', '.join(map(str, folders))}")
        origin[part] = found
    raw: dict[str, dict[str, Any]] = {}
    unet = _model_config(origin["unet"] / "unet" / "config.json", UNetConfig, raw, "unet")
    vae = _model_config(origin["vae"] / "vae" / "config.json", AutoencoderKLConfig, raw, "vae")
    texts = {part: read_json(origin[part] / part / "config.json") for part in towers}
    tokenizers = {
        part: next((f / _TOKENIZERS[part] for f in folders if _has_tokenizer(f / _TOKENIZERS[part])), None)
        for part in towers
    }
    sdxl = "text_encoder_2" in towers
    for folder in folders:
        if (folder / "pipeline.json").is_file():
            path = folder / "pipeline.json"
            config = parse_config(path, PipelineConfig.from_dict, read_json(path))
            return _Configs(unet, vae, texts, tokenizers, config, str(path), raw, origin)
        path = folder / "scheduler" / "scheduler_config.json"
        if path.is_file():
            raw["scheduler"] = read_json(path)
            schedule, prediction, sampling = parse_config(path, translate_scheduler, raw["scheduler"])
            given = f"{path}'s prediction_type" if "prediction_type" in raw["scheduler"] else None
            index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
            text = TextEncoderConfig(
                kind="sdxl" if sdxl else "clip", force_zeros_for_empty_prompt=_force_zeros(index, sdxl)
            )
            config = PipelineConfig(text_encoder=text, prediction=prediction, schedule=schedule, sampling=sampling)
            return _Configs(unet, vae, texts, tokenizers, config, given, raw, origin)
    raise FileNotFoundError(
        f"neither pipeline.json nor scheduler/scheduler_config.json in {', '.join(map(str, folders))}"
    )


def _model_config(path: Path, cls: Any, raw: dict[str, dict[str, Any]], part: str) -> Any:
    """Our config.json (``_type``) or diffusers' (``_class_name``, kept in ``raw``)."""
    data = read_json(path)
    if "_type" in data:
        return parse_config(path, cls.from_dict, {k: v for k, v in data.items() if k != "_type"})
    raw[part] = data
    return parse_config(path, cls.from_diffusers, data)


def _read_single_file(
    path: Path, *, prediction: str | None, config: str | Path | None, allow_pickle: bool, ema: bool
) -> _Layout:
    ckpt = sf.Checkpoint(path, allow_pickle=allow_pickle)
    try:
        family = sf.detect_family(ckpt)
        shipped = sf.FAMILY_CONFIGS / family.configs
        folders = [_require_folder(Path(config)), shipped] if config is not None else [shipped]
        configs = _read_configs(folders, tuple(t.component for t in family.towers))
        if prediction is not None:
            check_choice("prediction", prediction, PREDICTIONS)
            why = "the prediction argument"
        elif configs.prediction_source is not None:
            prediction, why = configs.config.prediction, configs.prediction_source
        else:
            prediction, why = sf.detect_prediction(ckpt, family)
        kind = "sdxl" if family.sdxl else "clip"
        if configs.config.text_encoder.kind != kind:
            raise ValueError(
                f"{config}: text_encoder.kind={configs.config.text_encoder.kind!r}; a {family.title} single file's is "
                f"{kind!r}"
            )
        configs.config = dataclasses.replace(configs.config, prediction=prediction)
        if configs.origin["unet"] == shipped:  # the file's input channels; SD 2.x 768-v is the v-prediction one
            size = 64 if family.sd2 and prediction != "v_prediction" else configs.unet.sample_size
            changes = dict(in_channels=ckpt.shape(sf.LDM_UNET + "input_blocks.0.0.weight")[1], sample_size=size)
            configs.unet = dataclasses.replace(configs.unet, **changes)
            configs.diffusers["unet"] = {**configs.diffusers["unet"], **changes}
        nets = _networks(configs)
        tensors, used_ema = _single_file_tensors(ckpt, family, configs, nets, ema)
    except BaseException:
        ckpt.close()
        raise
    info = SingleFileInfo(family.name, prediction, why, used_ema)
    LOG.info(
        "%s: %s, prediction %s (from %s)%s", path, family.title, prediction, why, ", EMA U-Net" if used_ema else ""
    )
    return _Layout(family, configs, nets, tensors, [ckpt], info)


def _single_file_tensors(
    ckpt: sf.Checkpoint, family: sf.Family, configs: _Configs, nets: dict[str, torch.nn.Module], ema: bool
) -> tuple[dict[str, dict[str, sf.Lazy]], bool]:
    """The networks' tensors under our names; every key of the file used or recognised, else one error."""
    plans = _plans(family, configs, nets, ckpt.keys)
    has_ema = any(k.startswith(sf.EMA) and k not in sf.SKIPPED_KEYS for k in ckpt.keys)
    if ema and not has_ema:
        LOG.warning("%s holds no EMA weights (model_ema.*): its U-Net weights are loaded", ckpt.path)
    use_ema = ema and has_ema
    if use_ema:
        plans["unet"] = [dataclasses.replace(e, ldm=sf.ema_key(e.ldm)) for e in plans["unet"]]
    unused = [sf.LDM_UNET if use_ema else sf.EMA]
    if family.sd2:  # SD 2.x conditions on the penultimate layer: the file's last one is not used
        unused.append(f"{sf.SD2_TEXT}transformer.resblocks.{nets['text_encoder'].config.num_hidden_layers}.")

    def skipped(key: str) -> bool:
        return key in sf.SKIPPED_KEYS or key.startswith(tuple(unused))

    where = ", ".join(sorted({str(p) for p in configs.origin.values()}))
    hint = f"the networks are configured from {where}; pass config=<a diffusers or unnoise folder> for other shapes"
    sf.check_keys(ckpt, {e.ldm for plan in plans.values() for e in plan}, skipped, hint)
    source = ckpt.lazy()
    return {name: sf.to_ours(plan, source) for name, plan in plans.items()}, use_ema


def _networks(configs: _Configs) -> dict[str, torch.nn.Module]:
    """The networks on the meta device: their keys and shapes, no memory; each text encoder the transformers class its
    config's ``architectures`` names (SDXL's bigG: CLIPTextModelWithProjection)."""
    transformers = import_transformers()
    nets = {
        "unet": sf.meta_network(lambda: UNet(configs.unet)),
        "vae": sf.meta_network(lambda: AutoencoderKL(configs.vae)),
    }
    for part, data in configs.texts.items():
        projected = "CLIPTextModelWithProjection" in (data.get("architectures") or [])
        cls = transformers.CLIPTextModelWithProjection if projected else transformers.CLIPTextModel
        text = transformers.CLIPTextConfig.from_dict(data)
        nets[part] = sf.meta_network(lambda cls=cls, text=text: cls(text))
    return nets


def _plans(
    family: sf.Family, configs: _Configs, nets: dict[str, torch.nn.Module], file_keys: list[str] | None = None
) -> dict[str, list[sf.Entry]]:
    """The key plans of the networks; SD 1.x text keys of files from transformers < 4.22 lack ``text_model.``."""
    plans = {
        "unet": sf.unet_plan(configs.unet, nets["unet"].state_dict()),
        "vae": sf.vae_plan(configs.vae, nets["vae"].state_dict()),
    }
    for tower in family.towers:
        net, prefix = nets[tower.component], tower.prefix
        names = sf.text_keys(net)
        if tower.openclip:
            layers = net.config.num_hidden_layers
            plans[tower.component] = sf.openclip_plan(layers, prefix, projection="text_projection.weight" in names)
        else:
            inner = [k for k in file_keys or [] if k.startswith(prefix)]
            legacy = bool(inner) and not any(k.startswith(prefix + "text_model.") for k in inner)
            plans[tower.component] = sf.clip_plan(names, prefix if legacy else prefix + "text_model.")
    return plans


def _family_of(configs: _Configs) -> sf.Family:
    """A folder's family: SDXL has bigG as text_encoder_2 (the refiner has it alone); else SD 2.x's text encoder is
    OpenCLIP (GELU), SD 1.x's OpenAI CLIP (quick GELU); 9 input channels: inpainting."""
    inpainting = configs.unet.in_channels == 9
    if "text_encoder_2" in configs.texts:
        refiner = "text_encoder" not in configs.texts
        return sf.FAMILIES["sdxl-refiner" if refiner else "sdxl-inpainting" if inpainting else "sdxl-base"]
    openclip = configs.texts["text_encoder"].get("hidden_act") == "gelu"
    return sf.FAMILIES[("sd2" if openclip else "sd1") + ("-inpainting" if inpainting else "")]


# A component's weights files in each layout, in the order looked for (pickles last: read with allow_pickle only).
_WEIGHTS = {
    "ours": ("model.safetensors",),
    "diffusers": (*_DIFFUSERS_WEIGHTS, "diffusion_pytorch_model.bin"),
    "transformers": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin"),
}


def _folder_towers(folder: Path, ours: bool) -> tuple[str, ...]:
    """The text encoders of our folder (``pipeline.json``'s kind; an SDXL refiner has no ``text_encoder/``) or of a
    diffusers folder (those its model_index.json lists)."""
    if not ours:
        index = _check_model_index(folder, sdxl=True)
        return tuple(name for name in _TOKENIZERS if _listed(index, name) is not None)
    path = folder / "pipeline.json"
    kind = parse_config(path, PipelineConfig.from_dict, read_json(path)).text_encoder.kind
    if kind not in ("clip", "sdxl"):
        raise ValueError(
            f"{path}: text_encoder.kind={kind!r}; only pipelines with CLIP text encoders (SD, SDXL) convert"
        )
    first = ("text_encoder",) if kind == "clip" or (folder / "text_encoder").is_dir() else ()
    return first + (("text_encoder_2",) if kind == "sdxl" else ())


def _read_folder(folder: Path, *, allow_pickle: bool) -> _Layout:
    """Our folder or a diffusers folder, its tensors under our names."""
    ours = (folder / "pipeline.json").is_file()
    configs = _read_configs([folder], _folder_towers(folder, ours))
    missing = [_TOKENIZERS[part] for part, found in configs.tokenizers.items() if found is None]
    if missing:
        raise FileNotFoundError(
            f"{folder}: no {missing[0]}/ with tokenizer.json or vocab.json; a pipeline converts with it"
        )
    files = []
    try:
        tensors = {}
        for name in ("unet", "vae", *configs.texts):
            names = _WEIGHTS["ours" if ours else "transformers" if name in configs.texts else "diffusers"]
            path = next((folder / name / n for n in names if (folder / name / n).is_file()), None)
            if path is None:
                raise FileNotFoundError(f"{folder / name} holds none of {list(names)}")
            files.append(sf.Checkpoint(path, allow_pickle=allow_pickle))
            tensors[name] = files[-1].lazy(_text_name if name in configs.texts else diffusers_key)
    except BaseException:
        for file in files:
            file.close()
        raise
    return _Layout(_family_of(configs), configs, _networks(configs), tensors, files)


def _text_name(key: str) -> str | None:
    """Our name of a saved CLIPTextModel(WithProjection) tensor: no ``text_model.`` level, no constant position ids."""
    return None if key.endswith("position_ids") else key.removeprefix("text_model.")


def _saved_text_name(key: str) -> str:
    """transformers' saved name of a text-encoder tensor: the tower under ``text_model.`` (as transformers 4 reads it
    too), the projection of CLIPTextModelWithProjection beside it."""
    return key if key.startswith("text_projection.") else f"text_model.{key}"


# -- loading a single file ------------------------------------------------------------------------------------------


def load_single_file(
    path: str | Path,
    *,
    prediction: str | None = None,
    config: str | Path | None = None,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    ema: bool = False,
) -> Components:
    """Load a single-file SD 1.x/2.x, SDXL base or refiner (or inpainting) checkpoint, each tensor mapped or converted
    once into its network; SDXL's text encoder is a ``DualCLIPTextEncoder`` (the refiner's has bigG alone).

    ``prediction`` overrides the prediction type, else ``config``'s scheduler decides, else the file
    (``single_file.detect_prediction``); ``config`` is a diffusers or unnoise folder for configs the family's shipped
    ones do not fit; ``dtype`` (default float32) applies to the U-Net and to a VAE without ``force_upcast``, as
    ``Pipeline.to`` does; ``allow_pickle`` lets a ``.ckpt`` load; ``ema`` loads the file's EMA U-Net weights if it has
    them. What was detected is in ``Components.single_file``.
    """
    path = Path(path)
    layout = _read_single_file(path, prediction=prediction, config=config, allow_pickle=allow_pickle, ema=ema)
    try:
        unet, vae, texts = _load_networks(layout, dtype or torch.float32, source=str(path))
    finally:
        layout.close()
    sdxl, clip_skip = layout.family.sdxl, layout.configs.config.text_encoder.clip_skip
    encoders = {
        part: CLIPTextEncoder(model, _tokenizer(layout, part), clip_skip=clip_skip, penultimate=sdxl)
        for part, model in texts.items()
    }
    encoder = DualCLIPTextEncoder(encoders.get("text_encoder"), encoders["text_encoder_2"]) if sdxl else None
    return Components(unet, vae, encoder or encoders["text_encoder"], layout.configs.config, path, layout.info)


def _load_networks(layout: _Layout, dtype: torch.dtype, *, source: str) -> tuple[Any, Any, dict[str, Any]]:
    """The U-Net in ``dtype``, the VAE too unless ``force_upcast``, the text encoders in float32."""
    nets = layout.nets
    vae_dtype = torch.float32 if layout.configs.vae.force_upcast else dtype
    unet = sf.load_network(nets["unet"], layout.tensors["unet"], dtype=dtype, source=source)
    vae = sf.load_network(nets["vae"], layout.tensors["vae"], dtype=vae_dtype, source=source)
    texts = {
        part: sf.load_network(
            nets[part], layout.tensors[part], dtype=torch.float32, source=source, names=sf.text_keys(nets[part])
        )
        for part in layout.configs.texts
    }
    return unet, vae, texts


def _tokenizer(layout: _Layout, part: str) -> Any:
    """transformers' CLIPTokenizer of text encoder ``part`` from the configured tokenizer folder, or the family's
    shipped one."""
    transformers = import_transformers()
    with quiet_transformers(transformers):
        folder = layout.configs.tokenizers[part]
        if folder is None:
            return sf.clip_tokenizer(layout.family, _TOKENIZERS[part])
        return transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _write_tokenizer(layout: _Layout, part: str, folder: Path) -> Path:
    if layout.configs.tokenizers[part] is not None:
        shutil.copytree(layout.configs.tokenizers[part], folder)
    else:
        sf.write_clip_tokenizer(folder, layout.family, _TOKENIZERS[part])
    return folder


# -- converting between layouts ----------------------------------------------------------------------------------------


def convert(
    source: str | Path,
    destination: str | Path,
    *,
    to: str,
    dtype: torch.dtype | None = None,
    config: str | Path | None = None,
    prediction: str | None = None,
    allow_pickle: bool = False,
    ema: bool = False,
) -> Path:
    """Write ``source`` (a single file, a diffusers folder or ours) as ``to``: "single-file" (one .safetensors with
    the prediction type in its metadata), "diffusers" or "unnoise". Tensors are copied one at a time, bit for bit
    unless ``dtype`` converts the floating-point ones; a single file's configs come as in ``load_single_file``."""
    check_choice("to", to, LAYOUTS)
    source, destination = resolve_model(source), Path(destination)
    if destination.exists() and (destination.is_file() or any(destination.iterdir())):
        raise FileExistsError(f"{destination} exists; name a new file or folder")
    if source.is_file():
        layout = _read_single_file(source, prediction=prediction, config=config, allow_pickle=allow_pickle, ema=ema)
    else:
        if config is not None or prediction is not None or ema:
            raise ValueError("config, prediction and ema apply to a single-file source only")
        layout = _read_folder(source, allow_pickle=allow_pickle)
    try:
        _check_tensors(layout, str(source))
        {"single-file": _write_single_file, "diffusers": _write_diffusers, "unnoise": _write_ours}[to](
            layout, destination, dtype
        )
    finally:
        layout.close()
    return destination


def _check_tensors(layout: _Layout, source: str) -> None:
    for name, net in layout.nets.items():
        names = sf.text_keys(net) if name in layout.configs.texts else None
        sf.check_tensors(net, layout.tensors[name], names=names, source=source)


def _write_single_file(layout: _Layout, path: Path, dtype: torch.dtype | None) -> None:
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a single file is written as .safetensors")
    plans = _plans(layout.family, layout.configs, layout.nets)
    tensors = {k: v for name, plan in plans.items() for k, v in sf.to_ldm(plan, layout.tensors[name]).items()}
    spec = {"v_prediction": "v"}.get(layout.configs.config.prediction, layout.configs.config.prediction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write_safetensors(path, tensors, dtype=dtype, metadata={"format": "pt", "modelspec.prediction_type": spec})


def _write_networks(layout: _Layout, folder: Path, dtype: torch.dtype | None, names: tuple[str, str]) -> None:
    """The U-Net's and the VAE's weights as ``names[0]``, each text encoder's as transformers writes them
    (``names[1]``, ``_saved_text_name``), its config and its tokenizer folder."""
    texts = layout.configs.texts
    for part in ("unet", "vae", *texts):
        (folder / part).mkdir(parents=True)
    meta = {"format": "pt"}
    for part in ("unet", "vae"):
        sf.write_safetensors(folder / part / names[0], layout.tensors[part], dtype=dtype, metadata=meta)
    for part, config in texts.items():
        text = {_saved_text_name(k): v for k, v in layout.tensors[part].items()}
        sf.write_safetensors(folder / part / names[1], text, dtype=dtype, metadata=meta)
        _write_json(folder / part / "config.json", config)
        _write_tokenizer(layout, part, folder / _TOKENIZERS[part])


def _write_diffusers(layout: _Layout, folder: Path, dtype: torch.dtype | None) -> None:
    c = layout.configs
    _write_networks(layout, folder, dtype, ("diffusion_pytorch_model.safetensors", "model.safetensors"))
    _write_json(folder / "unet" / "config.json", c.diffusers.get("unet") or sf.diffusers_unet_config(c.unet))
    _write_json(folder / "vae" / "config.json", c.diffusers.get("vae") or sf.diffusers_vae_config(c.vae))
    scheduler = c.diffusers.get("scheduler") or diffusers_scheduler_config(c.config)
    _write_json(folder / "scheduler" / "scheduler_config.json", {**scheduler, "prediction_type": c.config.prediction})
    _write_json(folder / "model_index.json", _model_index(layout, scheduler["_class_name"]))


def _model_index(layout: _Layout, scheduler: str) -> dict[str, Any]:
    """diffusers' model_index.json of the family's pipeline class; SDXL's lists its absent parts as [null, null]."""
    c, family = layout.configs, layout.family
    index: dict[str, Any] = {"_class_name": family.pipeline, "feature_extractor": [None, None]}
    index |= {"image_encoder": [None, None], "scheduler": ["diffusers", scheduler]}
    index |= {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for part, data in c.texts.items():
        index[part] = ["transformers", (data.get("architectures") or ["CLIPTextModel"])[0]]
        index[_TOKENIZERS[part]] = ["transformers", "CLIPTokenizer"]
    if not family.sdxl:
        return index | {"requires_safety_checker": False, "safety_checker": [None, None]}
    for part in _TOKENIZERS:
        index.setdefault(part, [None, None])
        index.setdefault(_TOKENIZERS[part], [None, None])
    index["force_zeros_for_empty_prompt"] = c.config.text_encoder.force_zeros_for_empty_prompt
    if family.pipeline != "StableDiffusionXLPipeline":  # img2img and inpainting: the refiner's aesthetic score
        pooled = c.texts["text_encoder_2"].get("projection_dim", 0)
        time_ids = (c.unet.projection_class_embeddings_input_dim - pooled) // c.unet.addition_time_embed_dim
        index["requires_aesthetics_score"] = time_ids == 5
    return index


def _write_ours(layout: _Layout, folder: Path, dtype: torch.dtype | None) -> None:
    c = layout.configs
    _write_networks(layout, folder, dtype, ("model.safetensors", "model.safetensors"))
    _write_json(folder / "unet" / "config.json", {"_type": "unet", **c.unet.to_dict()})
    _write_json(folder / "vae" / "config.json", {"_type": "autoencoder_kl", **c.vae.to_dict()})
    _write_json(folder / "pipeline.json", c.config.to_dict())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


_BETA_NAMES = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
    "sigmoid": "sigmoid",
}
_COMMON_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
_COMMON_KEYS += ("steps_offset", "timestep_spacing")


def diffusers_scheduler_config(config: PipelineConfig) -> dict[str, Any]:
    """A diffusers scheduler config that ``translate_scheduler`` reads back as exactly ``config``'s schedule,
    prediction and sampling options (the sampler's own class first, then any other); a ValueError if none does."""
    s, p = config.schedule, config.sampling
    spacing = p.span or (p.spacing if p.spacing in ("leading", "linspace", "trailing") else "linspace")
    values: dict[str, Any] = dict(
        num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
        beta_schedule=_BETA_NAMES[s.beta_schedule], trained_betas=list(s.trained_betas) if s.trained_betas else None,
        prediction_type=config.prediction, steps_offset=p.steps_offset, timestep_spacing=spacing,
        rescale_betas_zero_snr=s.rescale_zero_snr, clip_sample=False, set_alpha_to_one=p.final == "zero",
        final_sigmas_type=p.final, use_karras_sigmas=p.spacing == "karras",
        use_exponential_sigmas=p.spacing == "exponential", skip_prk_steps=True,
    )  # fmt: skip
    info = SAMPLER_INFO[p.sampler]
    names = sorted(SCHEDULERS, key=lambda name: name != info.diffusers_name)
    expected = (s, config.prediction, dataclasses.replace(p, steps=50, guidance_scale=7.5))
    for name in names:
        keys = (*_COMMON_KEYS, *SCHEDULERS[name], *(("skip_prk_steps",) if name == "PNDMScheduler" else ()))
        raw = {"_class_name": name, **{k: values[k] for k in keys if k in values}}
        raw |= dict(info.diffusers_config) if name == info.diffusers_name else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if translate_scheduler(raw) == expected:
                return raw
    raise ValueError(
        f"sampling.sampler={p.sampler!r} with spacing={p.spacing!r}, final={p.final!r}: no diffusers scheduler "
        "config reproduces this pipeline.json's sampling; convert to single-file or unnoise instead"
    )
