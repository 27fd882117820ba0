"""The server's settings: ``unnoise serve`` flags, one field each."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from unnoise.pipeline.loading import DEFAULT_MODEL

API_KEYS_ENV = "UNNOISE_API_KEYS"  # comma-separated keys, so that they need not appear in the process list


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """What ``unnoise serve`` runs: the model, its device, the limits of a request and of the queue."""

    model: Path = DEFAULT_MODEL
    host: str = "127.0.0.1"
    port: int = 8000
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None  # None: float16 on cuda, float32 on cpu
    cuda_graphs: bool = False  # the U-Net replayed as CUDA graphs (Pipeline.enable_cuda_graphs); CUDA devices only
    threads: int | None = None  # torch's intra-op CPU threads; None: torch's default
    max_queue: int = 64  # jobs waiting (not running); one more gets 429
    max_batch: int = 8  # images in one sampler run; the VRAM planner may allow fewer
    batch_wait_s: float = 0.02  # how long a batch waits for the last batch's clients to send their next requests
    vram_budget_gb: float | None = None  # None: 90% of the GPU's memory, or half the RAM on cpu
    api_keys: tuple[str, ...] = ()
    db: Path = Path("unnoise-serve.sqlite3")
    timeout_s: float = 300.0  # a job not done this long after it was submitted fails with 504
    drain_timeout_s: float = 120.0  # on SIGTERM, wait this long at most for accepted jobs
    max_steps: int = 150
    max_pixels: int = 1024 * 1024
    max_prompt_chars: int = 1000
    guidance_range: tuple[float, float] = (0.0, 30.0)
    any_size: bool = False  # serve sizes the model does not declare (pipeline.json "sizes"); refused with 400 if not
    warmup: bool = True  # one generation before /ready says yes
    safety: bool = True  # the prompt filter (400 with the category) and, with safety_clip, the image filter
    safety_clip: Path | None = None  # a CLIP model folder for the image filter (unnoise.safety.CLIPConceptFilter)
    lora_dir: Path | None = None  # LoRA files (*.safetensors) that requests may name by file stem (Pipeline.lora_dir)
    model_dir: Path | None = None  # models that AUTOMATIC1111's /options may switch to: pipeline folders, .safetensors

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_batch", "max_steps", "max_pixels", "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; expected an integer >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads!r} is not allowed; expected an integer >= 1 or None")
        for name in ("timeout_s", "drain_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; expected a number > 0")
        if not self.batch_wait_s >= 0:
            raise ValueError(f"batch_wait_s={self.batch_wait_s!r} is not allowed; expected a number >= 0")
        if self.vram_budget_gb is not None and not self.vram_budget_gb > 0:
            raise ValueError(f"vram_budget_gb={self.vram_budget_gb!r} is not allowed; expected a number > 0 or None")
        lo, hi = self.guidance_range
        if not lo <= hi:
            raise ValueError(
                f"guidance_range={self.guidance_range!r} is not allowed; expected (low, high), low <= high"
            )
        if any(not key for key in self.api_keys):
            raise ValueError("api_keys: an empty key is not allowed")

    def with_env_keys(self) -> ServeConfig:
        """This config with the keys of ``$UNNOISE_API_KEYS`` added."""
        extra = tuple(k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip())
        return dataclasses.replace(self, api_keys=self.api_keys + extra) if extra else self
