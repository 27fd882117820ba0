"""Routes: jobs with Server-Sent Events, stored images, LoRAs (OpenAI Images: ``openai``, AUTOMATIC1111: ``a1111``).

Every generation is a job in the store; the OpenAI and AUTOMATIC1111 routes submit and wait for it (cancelling it
if the client goes away), the jobs routes return at once. Any replica of a shared store answers for any job.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from unnoise.core.samplers import SAMPLERS
from unnoise.core.schedules import SPACINGS
from unnoise.models.lora import lora_hash
from unnoise.serve.engine import Engine
from unnoise.serve.jobs import Job, job_view
from unnoise.serve.schemas import ROW_LIMIT, JobRequest, job_values
from unnoise.serve.store import STATUSES
from unnoise.serve.validation import FIELDS_NATIVE, ApiError, GenerationSpec, build_spec, invalid

router = APIRouter()
LOG = logging.getLogger("unnoise.serve")
KEEP_ALIVE_S = 15.0


def request_spec(request: Request, values: dict[str, Any], fields: dict[str, str]) -> GenerationSpec:
    """Validate against the loaded model (503 while it loads), then the VRAM budget, then the prompt filter."""
    engine: Engine = request.app.state.engine
    engine.require_ready()
    spec = build_spec(values, fields, request.app.state.config, engine.pipe, engine.planner)
    reason = engine.refusal(spec.prompt)  # the negative prompt is not judged: it names what to avoid
    if reason is not None:
        raise ApiError(400, f"the prompt was refused by the content filter: {reason}", param=fields["prompt"],
                       code="content_policy_violation")  # fmt: skip
    return spec


async def wait_for_jobs(request: Request, jobs: list[Job]) -> None:
    """Wait until every job is finished; cancel them if the client disconnects first."""
    engine: Engine = request.app.state.engine
    loop = asyncio.get_running_loop()
    for job in jobs:
        finished = asyncio.Event()
        engine.subscribe(job, lambda event, data, e=finished: event == "done" and loop.call_soon_threadsafe(e.set))
        while not finished.is_set():
            try:
                await asyncio.wait_for(finished.wait(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    for other in jobs:
                        engine.cancel(other.id)
                    return


def raise_failed(jobs: list[Job]) -> None:
    for job in jobs:
        if job.status != "succeeded":
            status = job.http_status or (499 if job.status == "cancelled" else 500)
            raise ApiError(status, job.error or job.status, code=job.error_code, headers={"X-Job-Id": job.id})


def job_headers(jobs: list[Job]) -> dict[str, str]:
    return {"X-Job-Id": ",".join(j.id for j in jobs), "X-Batch-Size": ",".join(str(j.batch_size) for j in jobs)}


# -- LoRAs ----------------------------------------------------------------------------------------------------------


@router.get("/v1/loras")
def loras(request: Request) -> dict[str, Any]:
    """The LoRA adapters a request may name in ``loras``: the files of ``--lora-dir`` by stem and those loaded, each
    with its AUTOMATIC1111 short hash (as the PNG's "Lora hashes" records it) and whether it is loaded yet."""
    engine: Engine = request.app.state.engine  # a plain def: FastAPI runs it in a thread pool, as hashing takes time
    engine.require_ready()
    info = engine.pipe.lora_info
    data = []
    for name, path in engine.pipe.available_loras().items():
        if name in info:
            digest = info[name].hash
        else:
            stat = path.stat()
            digest = lora_file_hash(str(path), stat.st_mtime_ns, stat.st_size)
        data.append({"name": name, "object": "lora", "hash": digest, "loaded": name in info})
    return {"object": "list", "data": data}


@functools.lru_cache(maxsize=1024)
def lora_file_hash(path: str, mtime_ns: int, size: int) -> str:
    """``lora_hash`` of a file, once per version of it (its modification time and size are part of the key)."""
    return lora_hash(path)


# -- the model -----------------------------------------------------------------------------------------------------


@router.get("/v1/model")
async def model(request: Request) -> dict[str, Any]:
    """The model served and what a request to it may ask, as the web page builds its form: the sizes it declares
    (``pipeline.json``; null: any multiple of ``latent_factor``) and whether others are served (``--any-size``), the
    samplers and spacings, the model's defaults and the server's limits."""
    engine: Engine = request.app.state.engine
    engine.require_ready()
    pipe, config = engine.pipe, request.app.state.config
    sampling, sizes = pipe.config.sampling, pipe.config.sizes
    return {
        "id": pipe.name, "hash": pipe.model_hash, "sizes": None if sizes is None else [list(s) for s in sizes],
        "default_size": list(pipe.default_size), "any_size": config.any_size, "latent_factor": pipe.vae_factor,
        "samplers": list(SAMPLERS), "spacings": list(SPACINGS),
        "defaults": {"sampler": sampling.sampler, "spacing": sampling.spacing, "steps": sampling.steps,
                     "guidance_scale": sampling.guidance_scale},
        "limits": {"max_batch": config.max_batch, "max_steps": config.max_steps, "max_pixels": config.max_pixels,
                   "guidance_range": list(config.guidance_range)},
    }  # fmt: skip


# -- jobs ----------------------------------------------------------------------------------------------------------


@router.post("/v1/jobs", status_code=202)
async def create_job(body: JobRequest, request: Request) -> JSONResponse:
    """Queue a job and return it at once (202): poll ``GET /v1/jobs/{id}`` or stream its events."""
    spec = request_spec(request, job_values(body), FIELDS_NATIVE)
    [job] = request.app.state.engine.submit([spec], "jobs")
    return JSONResponse(job_view(job.record(), str(request.base_url)), status_code=202)


@router.get("/v1/jobs")
async def list_jobs(
    request: Request,
    limit: int = Query(20, ge=1, le=100),
    offset: int = Query(0, ge=0, le=ROW_LIMIT),
    status: str | None = Query(None),
) -> dict[str, Any]:
    """Job history, newest first, with paging."""
    if status is not None and status not in STATUSES:
        raise invalid("status", status, f"allowed: {', '.join(STATUSES)}")
    records, total = request.app.state.store.page(limit, offset, status)
    engine: Engine = request.app.state.engine
    records = [engine.record(r["id"]) or r if r["status"] == "running" else r for r in records]
    base = str(request.base_url)
    next_offset = offset + len(records) if offset + len(records) < total else None
    data = [job_view(r, base) for r in records]
    return {
        "object": "list",
        "data": data,
        "total": total,
        "limit": limit,
        "offset": offset,
        "next_offset": next_offset,
    }


def _record(request: Request, job_id: str) -> dict[str, Any]:
    record = request.app.state.engine.record(job_id)
    if record is None:
        raise ApiError(404, f"job {job_id!r} does not exist", param="id", code="job_not_found")
    return record


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> dict[str, Any]:
    return job_view(_record(request, job_id), str(request.base_url))


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request) -> JSONResponse:
    """Cancel, whichever replica runs it: a queued job at once (200), a running one at its next sampler step (202);
    409 if it is finished."""
    outcome = request.app.state.engine.cancel(job_id)
    record = _record(request, job_id)
    if outcome == "finished":
        raise ApiError(409, f"job {job_id!r} is already {record['status']}", param="id", code="job_finished")
    return JSONResponse(job_view(record, str(request.base_url)), status_code=200 if outcome == "cancelled" else 202)


@router.get("/v1/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request) -> StreamingResponse:
    """Server-Sent Events: ``status``, ``progress`` (each sampler step when the job runs on this replica; from the
    store every few tenths of a second, ``sigma`` null, when it runs on another), then ``done`` with the job."""
    engine: Engine = request.app.state.engine
    base = str(request.base_url)
    job, record = engine.follow(job_id)
    if job is None and record is None:
        raise ApiError(404, f"job {job_id!r} does not exist", param="id", code="job_not_found")
    return StreamingResponse(_events(engine, job, record, base), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip


async def _events(engine: Engine, job: Job | None, record: dict[str, Any] | None, base: str) -> AsyncIterator[str]:
    if job is None:
        yield _sse("done", job_view(record, base))
        return
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    def listener(event: str, data: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (event, data))

    engine.subscribe(job, listener)
    try:
        yield _sse("status", {"status": job.status, "step": job.step, "total": job.spec.steps})
        while True:
            try:
                event, data = await asyncio.wait_for(queue.get(), KEEP_ALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            yield _sse(event, job_view(data, base) if event == "done" else data)
            if event == "done":
                return
    finally:
        engine.unsubscribe(job, listener)


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@router.get("/v1/images/{job_id}/{index}.png")
async def image(job_id: str, request: Request, index: int = Path(ge=0, le=ROW_LIMIT)) -> Response:
    """A generated image: PNG with its ``parameters`` text chunk."""
    png = request.app.state.store.image(job_id, index)
    if png is None:
        raise ApiError(404, f"job {job_id!r} has no image {index}", param="index", code="image_not_found")
    return Response(png, media_type="image/png")
