"""A pipeline in any of the three layouts (a single file, a diffusers folder, ours), read lazily: its configs, its
networks on the meta device and their tensors under our names, not read yet (``Layout``). Loading a single file
(``unnoise.pipeline.loading``) and converting (``unnoise.pipeline.convert``) both start here.

A single file lacks every config: they come from a ``config=`` folder (either layout; parts it lacks too come from
the family) or from the family's configs shipped in ``unnoise/weights/families/``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from unnoise.core.denoisers import PREDICTIONS
from unnoise.core.schedules import check_choice
from unnoise.models import single_file as sf
from unnoise.models import single_file_keys as keys
from unnoise.models.io import diffusers_key, parse_config, read_json
from unnoise.models.tensor_files import Checkpoint, Lazy, meta_network, state_keys, text_keys
from unnoise.models.text import import_transformers, quiet_transformers
from unnoise.models.unet import UNet, UNetConfig
from unnoise.models.vae import AutoencoderKL, AutoencoderKLConfig
from unnoise.pipeline.config import PipelineConfig, TextEncoderConfig
from unnoise.pipeline.folders import (
    DIFFUSERS_WEIGHTS,
    SingleFileInfo,
    check_model_index,
    force_zeros,
    has_tokenizer,
    listed,
    require_folder,
)
from unnoise.pipeline.schedulers import translate_scheduler

LOG = logging.getLogger("unnoise.loading")


@dataclasses.dataclass
class Configs:
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
class Layout:
    """A pipeline in any of the three layouts: configs, and tensors under our names read on demand."""

    family: sf.Family
    configs: Configs
    nets: dict[str, torch.nn.Module]  # "unet", "vae" and the text encoders on the meta device (``networks``)
    tensors: dict[str, dict[str, Lazy]]  # the same networks', under our names
    files: list[Checkpoint]
    info: SingleFileInfo | None = None

    def close(self) -> None:
        for file in self.files:
            file.close()


TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}  # each text encoder's tokenizer


def read_configs(folders: list[Path], towers: tuple[str, ...]) -> Configs:
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
        part: next((f / TOKENIZERS[part] for f in folders if has_tokenizer(f / TOKENIZERS[part])), None)
        for part in towers
    }
    sdxl = "text_encoder_2" in towers
    for folder in folders:
        if (folder / "pipeline.json").is_file():
            path = folder / "pipeline.json"
            config = parse_config(path, PipelineConfig.from_dict, read_json(path))
            return Configs(unet, vae, texts, tokenizers, config, str(path), raw, origin)
        path = folder / "scheduler" / "scheduler_config.json"
        if path.is_file():
            raw["scheduler"] = read_json(path)
            schedule, prediction, sampling = parse_config(path, translate_scheduler, raw["scheduler"])
            given = f"{path}'s prediction_type" if "prediction_type" in raw["scheduler"] else None
            index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
            text = TextEncoderConfig(
                kind="sdxl" if sdxl else "clip", force_zeros_for_empty_prompt=force_zeros(index, sdxl)
            )
            config = PipelineConfig(text_encoder=text, prediction=prediction, schedule=schedule, sampling=sampling)
            return Configs(unet, vae, texts, tokenizers, config, given, raw, origin)
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


def read_single_file(
    path: Path, *, prediction: str | None, config: str | Path | None, allow_pickle: bool, ema: bool
) -> Layout:
    ckpt = Checkpoint(path, allow_pickle=allow_pickle)
    try:
        family = sf.detect_family(ckpt)
        shipped = sf.FAMILY_CONFIGS / family.configs
        folders = [require_folder(Path(config)), shipped] if config is not None else [shipped]
        configs = read_configs(folders, tuple(t.component for t in family.towers))
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
            changes = dict(in_channels=ckpt.shape(keys.LDM_UNET + "input_blocks.0.0.weight")[1], sample_size=size)
            configs.unet = dataclasses.replace(configs.unet, **changes)
            configs.diffusers["unet"] = {**configs.diffusers["unet"], **changes}
        nets = networks(configs)
        tensors, used_ema = _single_file_tensors(ckpt, family, configs, nets, ema)
    except BaseException:
        ckpt.close()
        raise
    info = SingleFileInfo(family.name, prediction, why, used_ema)
    LOG.info(
        "%s: %s, prediction %s (from %s)%s", path, family.title, prediction, why, ", EMA U-Net" if used_ema else ""
    )
    return Layout(family, configs, nets, tensors, [ckpt], info)


def _single_file_tensors(
    ckpt: Checkpoint, family: sf.Family, configs: Configs, nets: dict[str, torch.nn.Module], ema: bool
) -> tuple[dict[str, dict[str, Lazy]], bool]:
    """The networks' tensors under our names; every key of the file used or recognised, else one error."""
    plans = key_plans(family, configs, nets, ckpt.keys)
    has_ema = any(k.startswith(sf.EMA) and k not in sf.SKIPPED_KEYS for k in ckpt.keys)
    if ema and not has_ema:
        LOG.warning("%s holds no EMA weights (model_ema.*): its U-Net weights are loaded", ckpt.path)
    use_ema = ema and has_ema
    if use_ema:
        plans["unet"] = [dataclasses.replace(e, ldm=sf.ema_key(e.ldm)) for e in plans["unet"]]
    unused = [keys.LDM_UNET if use_ema else sf.EMA]
    if family.sd2:  # SD 2.x conditions on the penultimate layer: the file's last one is not used
        unused.append(f"{keys.SD2_TEXT}transformer.resblocks.{nets['text_encoder'].config.num_hidden_layers}.")

    def skipped(key: str) -> bool:
        return key in sf.SKIPPED_KEYS or key.startswith(tuple(unused))

    where = ", ".join(sorted({str(p) for p in configs.origin.values()}))
    hint = f"the networks are configured from {where}; pass config=<a diffusers or unnoise folder> for other shapes"
    sf.check_keys(ckpt, {e.ldm for plan in plans.values() for e in plan}, skipped, hint)
    source = ckpt.lazy()
    return {name: keys.to_ours(plan, source) for name, plan in plans.items()}, use_ema


def networks(configs: Configs) -> dict[str, torch.nn.Module]:
    """The networks on the meta device: their keys and shapes, no memory; each text encoder the transformers class its
    config's ``architectures`` names (SDXL's bigG: CLIPTextModelWithProjection)."""
    transformers = import_transformers()
    nets = {
        "unet": meta_network(lambda: UNet(configs.unet)),
        "vae": meta_network(lambda: AutoencoderKL(configs.vae)),
    }
    for part, data in configs.texts.items():
        projected = "CLIPTextModelWithProjection" in (data.get("architectures") or [])
        cls = transformers.CLIPTextModelWithProjection if projected else transformers.CLIPTextModel
        text = transformers.CLIPTextConfig.from_dict(data)
        nets[part] = meta_network(lambda cls=cls, text=text: cls(text))
    return nets


def key_plans(
    family: sf.Family, configs: Configs, nets: dict[str, torch.nn.Module], file_keys: list[str] | None = None
) -> dict[str, list[keys.Entry]]:
    """The key plans of the networks; SD 1.x text keys of files from transformers < 4.22 lack ``text_model.``."""
    plans = {
        "unet": keys.unet_plan(configs.unet, state_keys(nets["unet"])),
        "vae": keys.vae_plan(configs.vae, state_keys(nets["vae"])),
    }
    for tower in family.towers:
        net, prefix = nets[tower.component], tower.prefix
        names = text_keys(net)
        if tower.openclip:
            layers = net.config.num_hidden_layers
            plans[tower.component] = keys.openclip_plan(layers, prefix, projection="text_projection.weight" in names)
        else:
            inner = [k for k in file_keys or [] if k.startswith(prefix)]
            legacy = bool(inner) and not any(k.startswith(prefix + "text_model.") for k in inner)
            plans[tower.component] = keys.clip_plan(names, prefix if legacy else prefix + "text_model.")
    return plans


def _family_of(configs: Configs) -> sf.Family:
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
    "diffusers": (*DIFFUSERS_WEIGHTS, "diffusion_pytorch_model.bin"),
    "transformers": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin"),
}


def _folder_towers(folder: Path, ours: bool) -> tuple[str, ...]:
    """The text encoders of our folder (``pipeline.json``'s kind; an SDXL refiner has no ``text_encoder/``) or of a
    diffusers folder (those its model_index.json lists)."""
    if not ours:
        index = check_model_index(folder, sdxl=True)
        return tuple(name for name in TOKENIZERS if listed(index, name) is not None)
    path = folder / "pipeline.json"
    kind = parse_config(path, PipelineConfig.from_dict, read_json(path)).text_encoder.kind
    if kind not in ("clip", "sdxl"):
        raise ValueError(
            f"{path}: text_encoder.kind={kind!r}; only pipelines with CLIP text encoders (SD, SDXL) convert"
        )
    first = ("text_encoder",) if kind == "clip" or (folder / "text_encoder").is_dir() else ()
    return first + (("text_encoder_2",) if kind == "sdxl" else ())


def read_folder(folder: Path, *, allow_pickle: bool) -> Layout:
    """Our folder or a diffusers folder, its tensors under our names."""
    ours = (folder / "pipeline.json").is_file()
    configs = read_configs([folder], _folder_towers(folder, ours))
    missing = [TOKENIZERS[part] for part, found in configs.tokenizers.items() if found is None]
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
            files.append(Checkpoint(path, allow_pickle=allow_pickle))
            tensors[name] = files[-1].lazy(_text_name if name in configs.texts else diffusers_key)
    except BaseException:
        for file in files:
            file.close()
        raise
    return Layout(_family_of(configs), configs, networks(configs), tensors, files)


def _text_name(key: str) -> str | None:
    """Our name of a saved CLIPTextModel(WithProjection) tensor: no ``text_model.`` level, no constant position ids."""
    return None if key.endswith("position_ids") else key.removeprefix("text_model.")


def saved_text_name(key: str) -> str:
    """transformers' saved name of a text-encoder tensor: the tower under ``text_model.`` (as transformers 4 reads it
    too), the projection of CLIPTextModelWithProjection beside it."""
    return key if key.startswith("text_projection.") else f"text_model.{key}"


def tokenizer(layout: Layout, part: str) -> Any:
    """transformers' CLIPTokenizer of text encoder ``part`` from the configured tokenizer folder, or the family's
    shipped one."""
    transformers = import_transformers()
    with quiet_transformers(transformers):
        folder = layout.configs.tokenizers[part]
        if folder is None:
            return sf.clip_tokenizer(layout.family, TOKENIZERS[part])
        return transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def write_tokenizer(layout: Layout, part: str, folder: Path) -> Path:
    if layout.configs.tokenizers[part] is not None:
        shutil.copytree(layout.configs.tokenizers[part], folder)
    else:
        sf.write_clip_tokenizer(folder, layout.family, TOKENIZERS[part])
    return folder
