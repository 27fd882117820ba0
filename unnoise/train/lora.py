"""Training a LoRA (Hu et al. 2021) on a text-to-image pipeline: ``[lora]`` in a training config.

The base pipeline (``lora.base``: our folder, a diffusers Stable Diffusion folder or "default") gives the U-Net, the
autoencoder, the text encoder and the pipeline settings (prediction, schedule, sampling); all of them stay frozen.
The one trained module is the adapter (``LoRAAdapter.create``: ``up`` zero, so training starts from the base model),
attached to the U-Net (and with ``lora.text_encoder`` to the text encoder) by forward hooks. As ``model`` of the
task it gets the loop's AdamW, EMA, checkpoints and ``--resume`` unchanged; the sample grids and the exported file
use the EMA adapter. The export is ``out_dir/lora.safetensors`` in the kohya (default) or diffusers format.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from unnoise.data.base import ImageDataset
from unnoise.files import file_sha256
from unnoise.models import lora
from unnoise.models.lora import LoRAAdapter, save_lora
from unnoise.pipeline.loading import load_components, resolve_model
from unnoise.train.config import LoRAConfig, TrainConfig
from unnoise.train.distributed import World
from unnoise.train.tasks import DiffusionTask

# The attention projections of each text-encoder family, by the last part of their module path.
TEXT_ENCODER_TARGETS = {
    "clip": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "minilm": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
}
# The weights file of a model folder: ours, then diffusers' names (as the pipeline loader looks for them).
WEIGHTS_FILES = (
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
)
TRAINING_NAME = "training"  # the adapter's name on the base networks while training
SAMPLES_NAME = "averaged"  # the EMA adapter's name while a sample grid is drawn


class TrainedAdapter(LoRAAdapter):
    """The adapter as a training module: ``forward(run, *args, **kwargs)`` runs the frozen network it is attached
    to. DistributedDataParallel reduces a module's gradients only after a forward pass of its own, so the U-Net is
    called through this one."""

    def forward(self, run: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
        return run(*args, **kwargs)


class LoRATask(DiffusionTask):
    """A LoRA on ``lora.base``'s U-Net (and text encoder), trained with the diffusion loss of ``DiffusionTask``."""

    def __init__(self, cfg: TrainConfig, dataset: ImageDataset, world: World):
        settings = cfg.lora
        parts = load_components(settings.base)
        folder = resolve_model(settings.base)
        self.base_hash = _unet_hash(parts.unet_weights, parts.unet)
        unet = parts.unet.eval().requires_grad_(False).to(world.device)
        factor = parts.vae.config.downsampling_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        if cfg.data.size % factor:
            raise ValueError(
                f"data.size={cfg.data.size} is not allowed for lora.base={settings.base!r}; allowed: a multiple of "
                f"{factor} (its autoencoder's factor times the U-Net's downsamplings)"
            )
        # the file the cached latents are keyed on: a single-file base holds its autoencoder itself
        vae_weights = folder if folder.is_file() else weights_file(folder / "vae")
        self.setup(cfg, dataset, world, unet, parts.vae, vae_weights, parts.text_encoder, parts.config, "text")
        generator = torch.Generator().manual_seed(cfg.seed)
        adapter = _create(TrainedAdapter, {"unet": unet}, settings.targets, settings, generator, convs=settings.convs)
        if settings.text_encoder:
            targets = TEXT_ENCODER_TARGETS[parts.config.text_encoder.kind]
            text = _create(LoRAAdapter, {"text_encoder": self.encoder.lora_root()}, targets, settings, generator)
            for key, (net, path) in text.targets.items():
                adapter.add(net, path, text.layers[key])
        for net in adapter.counts():
            lora.attach(self.networks()[net], adapter, name=TRAINING_NAME, net=net)
        self.modules = {"model": adapter}

    def networks(self) -> dict[str, nn.Module]:
        """The base networks an adapter attaches to, by the names of the LoRA file formats."""
        return {"unet": self.unet, "text_encoder": self.encoder.lora_root()}

    def encode(self, texts: list[str]) -> Tensor:
        """Cached states of the frozen text encoder, or, with its LoRA, states encoded now (with the autograd graph
        while training)."""
        if not self.cfg.lora.text_encoder:
            return super().encode(texts)
        states = self.encoder.encode(texts, grad=torch.is_grad_enabled()).hidden_states
        return states.to(self.world.device)

    def network(self, nets: dict[str, nn.Module]) -> Callable[..., Tensor]:
        return functools.partial(nets["model"], self.unet)

    @torch.no_grad()
    def samples(self, model: nn.Module) -> Image.Image:
        """The sample grid of the base networks with ``model`` (the EMA adapter) in place of the trained one."""
        with self._only(model):
            return self.sample_grid(self.unet)

    @contextlib.contextmanager
    def _only(self, adapter: LoRAAdapter) -> Iterator[None]:
        """``adapter`` attached at scale 1 and the trained adapter at 0 inside the block."""
        networks = {net: self.networks()[net] for net in adapter.counts()}
        for net, network in networks.items():
            lora.attach(network, adapter, name=SAMPLES_NAME, net=net)
        try:
            with contextlib.ExitStack() as stack:
                for network in networks.values():
                    stack.enter_context(lora.scales_applied(network, {SAMPLES_NAME: 1.0}))
                yield
        finally:
            for network in networks.values():
                lora.detach(network, SAMPLES_NAME)

    def export_path(self, out_dir: Path) -> Path:
        return out_dir / "lora.safetensors"

    def export(self, model: nn.Module, path: Path) -> None:
        """``model`` (the EMA adapter) as ``lora.format``, with its settings, the base model's hash and the
        training config in the header, and kohya's ``sshs_model_hash`` (sha256 of the bytes after the header)."""
        settings = self.cfg.lora
        metadata = {
            "ss_network_dim": str(settings.rank),  # kohya's names for rank and alpha, which LoRA tools display
            "ss_network_alpha": str(settings.scale_alpha),
            "unnoise_targets": json.dumps(list(settings.targets)),
            "unnoise_convs": json.dumps(settings.convs),
            "unnoise_text_encoder": json.dumps(settings.text_encoder),
            "unnoise_base_model": settings.base,
            "unnoise_base_model_hash": self.base_hash,
            "unnoise_training_config": json.dumps(self.cfg.to_dict(), sort_keys=True),
        }
        save_lora(model, path, format=settings.format, metadata=metadata)
        digest = lora.tensor_data_sha256(path)
        save_lora(model, path, format=settings.format, metadata={**metadata, "sshs_model_hash": digest})
        if lora.tensor_data_sha256(path) != digest:  # the tensors' bytes do not depend on the header; make sure of it
            raise RuntimeError(f"{path}: the tensor data changed when the header was rewritten")


def _create(
    cls: type[LoRAAdapter],
    networks: dict[str, nn.Module],
    targets: tuple[str, ...],
    settings: LoRAConfig,
    generator: torch.Generator,
    *,
    convs: bool = False,
) -> LoRAAdapter:
    try:
        return cls.create(
            networks,
            rank=settings.rank,
            alpha=settings.scale_alpha,
            targets=targets,
            convs=convs,
            dropout=settings.dropout,
            generator=generator,
        )
    except ValueError as error:
        raise ValueError(f"lora.targets={list(targets)} with lora.base={settings.base!r}: {error}") from None


def weights_file(folder: Path) -> Path:
    found = next((folder / name for name in WEIGHTS_FILES if (folder / name).is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{folder} holds none of the weights files {list(WEIGHTS_FILES)}")
    return found


def _unet_hash(weights: Path | None, unet: nn.Module) -> str:
    """The base model's hash as ``Pipeline.model_hash`` gives it: the first 10 hex digits of the sha256 of the U-Net
    weights file (of the safetensors bytes of its state dict where it came from no single file)."""
    if weights is not None:
        return file_sha256(weights)[:10]
    from safetensors.torch import save

    return hashlib.sha256(save({k: v.contiguous() for k, v in unet.state_dict().items()})).hexdigest()[:10]
