"""A job: one request's images in flight, its progress and its listeners; and the JSON view of a job record."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from typing import Any

from PIL import Image, PngImagePlugin

from unnoise.serve.store import FINAL
from unnoise.serve.validation import GenerationSpec

# listener(event, data): "status" {status}, "progress" {step, total, sigma}, "done" {the job record}
Listener = Callable[[str, dict[str, Any]], None]


@dataclasses.dataclass(eq=False)
class Job:
    """One request: ``spec.n`` images from one sampler run (possibly shared with other jobs)."""

    id: str
    api: str
    spec: GenerationSpec
    created: float
    deadline: float
    status: str = "queued"
    started: float | None = None
    finished: float | None = None
    step: int = 0  # sampler steps done (the progress bar's numerator)
    batch_size: int | None = None  # images in the sampler run this job ran in
    error: str | None = None
    error_code: str | None = None
    http_status: int | None = None
    cancel_step: int | None = None  # ``step`` when a cancel was asked for
    images: list[tuple[int, str, bytes]] = dataclasses.field(default_factory=list)  # (seed, parameters, PNG)
    listeners: list[Listener] = dataclasses.field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.status in FINAL

    def record(self) -> dict[str, Any]:
        """The same dict as ``JobStore.get`` returns for this job."""
        return dict(
            id=self.id, api=self.api, status=self.status, spec=self.spec.to_dict(), created=self.created,
            started=self.started, finished=self.finished, steps_done=self.step, batch_size=self.batch_size,
            error=self.error, error_code=self.error_code, http_status=self.http_status, cancel_step=self.cancel_step,
            images=[{"index": i, "seed": s, "parameters": p} for i, (s, p, _) in enumerate(self.images)],
        )  # fmt: skip

    def emit(self, event: str, data: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            listener(event, data)


def job_view(record: dict[str, Any], base_url: str) -> dict[str, Any]:
    """A job record as the jobs API returns it: progress, request, error and image URLs."""
    spec = record["spec"]
    error = None
    if record["error"] is not None:
        error = {"message": record["error"], "code": record["error_code"], "http_status": record["http_status"]}
    return {
        "id": record["id"],
        "object": "job",
        "api": record["api"],
        "status": record["status"],
        "created_at": record["created"],
        "started_at": record["started"],
        "finished_at": record["finished"],
        "progress": {"step": record["steps_done"], "total": spec["steps"]},
        "batch_size": record["batch_size"],
        "cancel_step": record.get("cancel_step"),
        "request": spec,
        "error": error,
        "images": [
            {**image, "url": f"{base_url.rstrip('/')}/v1/images/{record['id']}/{image['index']}.png"}
            for image in record["images"]
        ],
    }


def png_bytes(image: Image.Image) -> bytes:
    """``image`` as PNG bytes with its ``parameters`` text chunk, as ``unnoise.pipeline.png.save_png`` writes files."""
    info = PngImagePlugin.PngInfo()
    if image.info.get("parameters") is not None:
        info.add_text("parameters", image.info["parameters"])
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()
