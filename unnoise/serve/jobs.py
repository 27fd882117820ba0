"""A job: one request's images in flight, its progress and its listeners; and the JSON view of a job record."""

from __future__ import annotations

import dataclasses
import io
import math
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
    group_id: str | None = None  # the first job of its request (AUTOMATIC1111's n_iter jobs share it)
    stop: tuple[str, str] | None = None  # (code, reason): a cancel its worker applies at the next step
    ending: bool = False  # its worker has decided its outcome and is recording it

    @property
    def done(self) -> bool:
        return self.status in FINAL

    @classmethod
    def of_record(cls, record: dict[str, Any], spec: GenerationSpec | None = None) -> Job:
        """The job of a store record (``Store.get``), with ``spec`` (its resolved request) if given."""
        deadline = math.inf if record["deadline"] is None else record["deadline"]
        spec = spec or GenerationSpec.from_dict(record["spec"])
        job = cls(record["id"], record["api"], spec, record["created"], deadline, group_id=record["group_id"])
        job.update(record)
        return job

    def update(self, record: dict[str, Any]) -> None:
        """Take the state of a store record of this job (images excepted)."""
        self.status, self.started, self.finished = record["status"], record["started"], record["finished"]
        self.step, self.batch_size, self.cancel_step = record["steps_done"], record["batch_size"], record["cancel_step"]
        self.error, self.error_code, self.http_status = record["error"], record["error_code"], record["http_status"]

    def record(self) -> dict[str, Any]:
        """The same dict as ``Store.get`` returns for this job (its queue columns aside)."""
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
