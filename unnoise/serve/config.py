"""The server's settings: ``unnoise serve`` flags, one field each."""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from pathlib import Path

from unnoise.pipeline.loading import DEFAULT_MODEL
from unnoise.serve.store import DEFAULT_LEASE_S, POSTGRES_SCHEMES, Store, open_store

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
    db: Path = Path("unnoise-serve.sqlite3")  # the job store of one server (SQLite), unless ``store`` is given
    store: str | None = None  # a postgresql:// URL: a job queue shared by several replicas
    images_dir: Path | None = None  # PNGs in files of this folder (every replica mounts it) instead of the database
    lease_s: float = DEFAULT_LEASE_S  # a claimed job returns to the queue this long after its worker stops renewing
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
        if self.store is not None and not self.store.startswith(POSTGRES_SCHEMES):
            raise ValueError(f"store={self.store!r} is not allowed; expected a postgresql:// URL (a SQLite file is "
                             "given with --db)")  # fmt: skip
        for name in ("timeout_s", "drain_timeout_s", "lease_s"):
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

    @property
    def store_location(self) -> str | Path:
        """Where the jobs are: ``store`` if given, else the SQLite file ``db`` (``unnoise.serve.store.open_store``)."""
        return self.store if self.store is not None else self.db

    def open_store(self) -> Store:
        """The job store at ``store_location`` with this config's images folder and lease."""
        return open_store(self.store_location, images_dir=self.images_dir, lease_s=self.lease_s)

    @property
    def store_shown(self) -> str | None:
        """``store`` with its password (if the URL has one) replaced by ``***``: what may be shown to clients."""
        if self.store is None:
            return None
        parts = urllib.parse.urlsplit(self.store)
        if parts.password is None:
            return self.store
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    def with_env_keys(self) -> ServeConfig:
        """This config with the keys of ``$UNNOISE_API_KEYS`` added."""
        extra = tuple(k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip())
        return dataclasses.replace(self, api_keys=self.api_keys + extra) if extra else self
