"""The engine: a bounded queue of jobs and one worker thread that batches them through the pipeline.

The worker takes the oldest queued job and every other queued job with the same ``batch_key`` (the pipeline's:
size, steps, sampler, guidance, LoRA adapters and their scales) in arrival order, up to the batch that
``--max-batch`` and the VRAM planner allow, and runs them as one sampler pass (``Pipeline.generate`` on their
resolved requests; it loads a LoRA of ``--lora-dir`` the first time a request names it); while fewer jobs are queued
than the last run had, it first waits a few milliseconds (``batch_wait_s``) for that run's clients to come back.
At each step it reports progress to each job's listeners and drops jobs that were cancelled or ran past their
deadline; when no job of the run is left, the run stops. An exception fails the jobs of that run with 500 (a run
of several jobs is first retried one job at a time, so one bad request cannot fail the others), and the worker goes
on with the next batch.

For AUTOMATIC1111's API the engine also keeps the running batch's progress (``progress``) and, when a client asks
for it, decodes a preview of the oldest running job between two sampler steps (the VAE never runs beside the U-Net,
and a server nobody polls decodes nothing; the safety stage's filter and watermark apply to it as to the images).
``interrupt`` and ``skip`` stop that API's running jobs at their next step (interrupt also drops the rest of their
request's ``n_iter`` batches, as AUTOMATIC1111 does); ``switch_model`` loads another model between batches: new jobs
get 503 from the request until the jobs queued before it have run and the new model is ready.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from unnoise.pipeline import GenerationCancelled, Pipeline
from unnoise.pipeline.png import make_grid
from unnoise.safety import SafetyChecker, SafetyConfig, image_verdict
from unnoise.serve.config import ServeConfig
from unnoise.serve.jobs import Job, Listener, png_bytes
from unnoise.serve.metrics import ServerMetrics
from unnoise.serve.store import JobStore
from unnoise.serve.validation import ApiError, GenerationSpec
from unnoise.serve.vram import GIB, VramPlanner

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STOPS = {"interrupted": "interrupted by the client (AUTOMATIC1111 /interrupt)",
         "skipped": "skipped by the client (AUTOMATIC1111 /skip)"}  # fmt: skip


@dataclasses.dataclass
class Progress:
    """The running batch as ``Engine.progress`` reports it: ``step`` of ``total`` sampler steps of pass
    ``pass_index`` of ``passes`` (two with the hires fix); ``total`` is None until the first step."""

    jobs: list[Job]  # the batch's jobs that are still running, oldest first
    waiting: int  # jobs queued behind it
    started: float
    passes: int = 1
    pass_index: int = 0
    step: int = 0
    total: int | None = None
    preview: Image.Image | None = None  # the oldest job's images (a grid for several) at ``preview_step``
    preview_step: int = 0
    interrupted: bool = False
    skipped: bool = False


@dataclasses.dataclass
class _Switch:
    """A ``switch_model`` request, answered by the worker between batches."""

    path: Path
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: str | None = None


class Engine:
    """``submit`` / ``cancel`` / ``subscribe`` from the API (any thread); ``start`` loads the model and runs jobs.

    Safety is the pipeline's (``Pipeline.safety``): the checker given here, else the one ``config`` asks for, built
    by ``Pipeline.enable_safety`` once the model is loaded; none with ``config.safety`` off.
    """

    def __init__(self, config: ServeConfig, store: JobStore, safety: SafetyChecker | None = None):
        self.config, self.store, self._safety = config, store, safety
        self.pipe: Pipeline | None = None
        self.planner: VramPlanner | None = None
        self.ready = False
        self.load_error: str | None = None
        self.model_unusable = False  # the load failed on the model's files (a user error), not in our code
        self.draining = False
        self.metrics = ServerMetrics(
            queue_depth=lambda: len(self._queue), running=lambda: len(self._running), ready=lambda: float(self.ready)
        )
        self._queue: list[Job] = []
        self._running: list[Job] = []
        self._live: dict[str, Job] = {}
        self._cond = threading.Condition()
        self._stopping = self._abort = False
        self._seconds_per_image = 1.0  # moving average, for Retry-After
        self._expected = 0  # jobs likely queued soon: see _await_returning_clients
        self._thread: threading.Thread | None = None
        self.model_path = config.model  # what ``pipe`` was loaded from (``switch_model`` changes it)
        self._switch: _Switch | None = None
        self._progress: Progress | None = None
        self._preview_wanted = False
        self._stops: dict[str, str] = {}  # running job id -> "interrupted" or "skipped": finished at its next step
        self._groups: dict[str, str] = {}  # job id -> the first job id of the submit call (a request's n_iter jobs)

    # -- life cycle ------------------------------------------------------------------------------------------------

    def start(self, pipe: Pipeline | None = None) -> None:
        """Load the model (or use ``pipe``), warm it up and serve jobs, in a background thread."""
        self._thread = threading.Thread(target=self._main, args=(pipe,), name="unnoise-engine", daemon=True)
        self._thread.start()

    def _main(self, pipe: Pipeline | None) -> None:
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        try:
            self.pipe, self.planner = self._prepare(pipe if pipe is not None else self._load(self.config.model))
        except Exception as error:  # noqa: BLE001 - reported by /ready, the process stays up for it
            self.model_unusable = isinstance(error, ValueError | OSError)  # the loaders' one-line file errors
            if not self.model_unusable:
                traceback.print_exc()
            self.load_error = f"{type(error).__name__}: {error}"
            return
        self.ready = True
        self._loop()

    def _load(self, path: Path) -> Pipeline:
        device = torch.device(self.config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = DTYPES[self.config.dtype or ("float16" if device.type == "cuda" else "float32")]
        return Pipeline.from_pretrained(path, device=device, dtype=dtype)

    def _prepare(self, pipe: Pipeline) -> tuple[Pipeline, VramPlanner]:
        """``pipe`` set up as the server runs it (CUDA graphs, LoRA folder, safety, hash, warm-up), and its planner."""
        if self.config.cuda_graphs:  # before the warm-up, which captures the first graph
            pipe.enable_cuda_graphs()
        if self.config.lora_dir is not None:
            # Pipeline.generate loads a file of it when a request first names it: here, never during a generation
            pipe.lora_dir = self.config.lora_dir
        if self._safety is not None:
            pipe.safety = self._safety
        elif self.config.safety:
            pipe.enable_safety(SafetyConfig(clip_model=self.config.safety_clip))
        else:
            pipe.safety = None
        planner = VramPlanner(pipe, _budget(self.config, pipe.device), self.config.max_batch)
        _ = pipe.model_hash  # hash the weights file once, here rather than in a request
        if self.config.warmup:
            pipe("warm-up", steps=2, seed=0)
        return pipe, planner

    def switch_model(self, path: Path, name: str) -> None:
        """Serve the model at ``path`` (``name`` for messages): blocks until the jobs queued now have run on the
        current model and the new one is loaded; meanwhile new jobs get 503. The current model stays if the new one
        fails to load (500, ``model_load_failed``)."""
        with self._cond:
            self.require_ready()
            switch = self._switch = _Switch(Path(path))
            self._cond.notify_all()
        switch.done.wait()
        if switch.error is not None:
            raise ApiError(500, f"the model {name!r} failed to load, {self.pipe.name!r} is still served: "
                           f"{switch.error}", param="sd_model_checkpoint", code="model_load_failed")  # fmt: skip

    def _run_switch(self, switch: _Switch) -> None:
        """Load ``switch.path`` (the worker, with no job queued or running); on a GPU the old model waits on the CPU
        meanwhile, so that the two need not fit together, and comes back if the new one fails."""
        old = self.pipe
        device = old.device
        self.ready = False  # /ready: 503 "loading" meanwhile
        try:
            if device.type == "cuda":
                old.to("cpu")
                torch.cuda.empty_cache()
            self.pipe, self.planner = self._prepare(self._load(switch.path))
            self.model_path = switch.path
        except Exception as error:  # noqa: BLE001 - answered to the request, the old model goes on
            if not isinstance(error, ValueError | OSError):
                traceback.print_exc()
            switch.error = f"{type(error).__name__}: {error}"
            self.pipe = old.to(device) if device.type == "cuda" else old
        finally:
            with self._cond:
                self._switch, self.ready = None, True
            switch.done.set()

    def begin_drain(self) -> None:
        """Refuse new jobs (503); the accepted ones still run."""
        with self._cond:
            self.draining = True

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._running

    def stop(self, timeout: float = 10.0) -> None:
        """Fail the queued jobs (503), let the running batch finish within ``timeout`` s, then abort it."""
        with self._cond:
            self._stopping = self.draining = True
            for job in list(self._queue):
                self._finish(job, "failed", error="the server shut down before this job ran", code="shutdown",
                             http_status=503)  # fmt: skip
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._abort = True
                self._thread.join(timeout)

    # -- API side --------------------------------------------------------------------------------------------------

    def require_ready(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down; retry on another instance", code="shutting_down",
                           headers={"Retry-After": "5"})  # fmt: skip
        if self._switch is not None:
            raise ApiError(503, f"the server is switching to the model {self._switch.path.name!r}; retry in a moment",
                           code="switching_model", headers={"Retry-After": "5"})  # fmt: skip
        if not self.ready:
            why = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise ApiError(503, why, code="not_ready", headers={"Retry-After": "5"})

    def refusal(self, prompt: str) -> str | None:
        """Why the pipeline's prompt filter refuses ``prompt`` (counted and logged), or None to let it through."""
        if self.pipe is None or self.pipe.safety is None:
            return None
        verdict = self.pipe.safety.check_prompt(prompt)
        if verdict.allowed:
            return None
        self.metrics.filter_blocks.inc(stage="prompt")
        logging.getLogger("unnoise.serve").warning("prompt blocked (%s): %r", verdict.reason, prompt[:200])
        return f"category {verdict.category}: {verdict.reason}"

    def submit(self, specs: Sequence[GenerationSpec], api: str) -> list[Job]:
        """Queue one job per spec, all or none: 429 with Retry-After when the queue has no room for them."""
        self.require_ready()
        now = time.time()
        with self._cond:
            self.require_ready()
            if len(self._queue) + len(specs) > self.config.max_queue:
                raise ApiError(
                    429, f"the queue is full ({len(self._queue)} of {self.config.max_queue} jobs waiting); retry later",
                    code="queue_full", headers={"Retry-After": str(self.retry_after())},
                )  # fmt: skip
            jobs = [Job(uuid.uuid4().hex, api, spec, now, now + self.config.timeout_s) for spec in specs]
            for job in jobs:
                self.store.insert(job.id, api, job.spec.to_dict(), now)
                self._queue.append(job)
                self._live[job.id] = job
                self._groups[job.id] = jobs[0].id
            self._cond.notify_all()
        return jobs

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved on: queued images times the recent seconds per image."""
        images = sum(job.spec.n for job in self._queue)
        return max(1, math.ceil(images * self._seconds_per_image / max(1, self.config.max_batch)))

    def live(self, job_id: str) -> Job | None:
        with self._cond:
            return self._live.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a live job: at once when queued, at its next sampler step when running; None if not live."""
        with self._cond:
            job = self._live.get(job_id)
            if job is None or job.done:
                return job
            if job.cancel_step is None:
                job.cancel_step = job.step
            if job.status == "queued":
                self._finish(job, "cancelled", error="cancelled by the client", code="cancelled")
            return job

    def interrupt(self, api: str) -> int:
        """AUTOMATIC1111's interrupt: the running jobs of ``api`` stop at their next sampler step, and the queued jobs
        of their requests are cancelled; returns how many jobs it stopped."""
        with self._cond:
            running = self._stop_running(api, "interrupted")
            groups = {self._groups.get(job.id) for job in running}
            queued = [job for job in self._queue if self._groups.get(job.id) in groups]
            for job in queued:
                self._finish(job, "cancelled", error=STOPS["interrupted"], code="interrupted")
            return len(running) + len(queued)

    def skip(self, api: str) -> int:
        """AUTOMATIC1111's skip: the running jobs of ``api`` stop at their next sampler step; the queue goes on."""
        with self._cond:
            return len(self._stop_running(api, "skipped"))

    def _stop_running(self, api: str, how: str) -> list[Job]:
        jobs = [job for job in self._running if job.api == api and not job.done and job.id not in self._stops]
        for job in jobs:
            self._stops[job.id] = how
        if jobs and self._progress is not None:
            setattr(self._progress, how, True)
        return jobs

    def progress(self, preview: bool = False) -> Progress | None:
        """The running batch (a copy), None when idle; ``preview=True`` asks the worker for a fresh preview at the
        next step (this call returns the last one)."""
        with self._cond:
            if self._progress is None:
                return None
            self._preview_wanted |= preview
            return dataclasses.replace(self._progress, jobs=[j for j in self._progress.jobs if not j.done],
                                       waiting=len(self._queue))  # fmt: skip

    def waiting(self) -> int:
        """Jobs queued (not running)."""
        with self._cond:
            return len(self._queue)

    def subscribe(self, job: Job, listener: Listener) -> None:
        """Call ``listener`` with the job's events; at once with "done" if it is already finished."""
        with self._cond:
            if not job.done:
                job.listeners.append(listener)
                return
        listener("done", job.record())

    def unsubscribe(self, job: Job, listener: Listener) -> None:
        with self._cond:
            if listener in job.listeners:
                job.listeners.remove(listener)

    # -- worker ----------------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping and self._switch is None:
                    self._cond.wait(timeout=1.0)
                if self._stopping:
                    if self._switch is not None:
                        self._switch.error = "the server shut down before the model was switched"
                        self._switch.done.set()
                    return
                switch = self._switch if not self._queue else None  # after the jobs queued before it
            if switch is not None:
                self._run_switch(switch)
                continue
            with self._cond:
                self._await_returning_clients()
                self._expire_queued(time.time())
                batch = self._take_batch()
                self._running = batch
            try:
                if batch:
                    self._execute(batch)
            finally:
                with self._cond:
                    self._running = []
                    self._expected = len(self._queue) + len(batch)  # those waiting and those about to return

    def _await_returning_clients(self) -> None:
        """Wait up to ``batch_wait_s`` while fewer jobs are queued than were queued or running at the end of the
        last batch.

        The clients of the last batch send their next requests a few milliseconds after their answers; starting
        at once would run those already queued without them, and so on: batches that never grow.
        """
        deadline = time.monotonic() + self.config.batch_wait_s
        expected = min(self._expected, self.config.max_batch)  # no need to wait for more than one batch takes
        while len(self._queue) < expected and not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _expire_queued(self, now: float) -> None:
        for job in [job for job in self._queue if now > job.deadline]:
            self._finish(job, "failed", error=_timeout_message(self.config), code="timeout", http_status=504)

    def _take_batch(self) -> list[Job]:
        """The oldest job and the next jobs with its batch key, while their images fit the allowed batch."""
        if not self._queue:
            return []
        key, spec = self._queue[0].spec.batch_key, self._queue[0].spec
        room = max(self.planner.max_batch(*spec.peak_size), spec.n)  # a job alone was checked at submit
        batch = []
        for job in self._queue:
            if job.spec.batch_key == key and job.spec.n <= room:
                batch.append(job)
                room -= job.spec.n
        for job in batch:
            self._queue.remove(job)
        return batch

    def _execute(self, batch: list[Job]) -> None:
        """Run ``batch``; if it raises, rerun its jobs one at a time so the failure stays with its job."""
        try:
            self._run(batch)
        except Exception as error:  # noqa: BLE001 - a request must never take the worker down
            traceback.print_exc(file=sys.stderr)
            active = [job for job in batch if not job.done]
            if len(active) > 1:
                for job in active:
                    self._execute([job])
                return
            with self._cond:
                for job in active:
                    message = f"generation failed: {type(error).__name__}: {error}"
                    self._finish(job, "failed", error=message, code="generation_error", http_status=500)

    def _run(self, batch: list[Job]) -> None:
        started = time.time()
        images = sum(job.spec.n for job in batch)
        with self._cond:
            passes = 2 if batch[0].spec.hires is not None else 1
            self._progress = Progress(list(batch), len(self._queue), started, passes)
            self._preview_wanted = False
            for job in batch:
                job.status, job.started, job.batch_size, job.step = "running", started, images, 0
                self.store.started(job.id, started, images)
                self.metrics.queue_seconds.observe(started - job.created)
                job.emit("status", {"status": "running", "batch_size": images})
        self.metrics.batch_size.observe(images)
        try:
            results = self.pipe.generate([job.spec.resolved for job in batch], self._on_step(batch))
        except GenerationCancelled:
            return  # every job of the run was finished by the step callback
        finally:
            with self._cond:
                self._progress = None
        elapsed = time.time() - started
        self.metrics.generation_seconds.observe(elapsed)
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * elapsed / images
        for job, result in zip(batch, results, strict=True):
            self._deliver(job, result)

    def _on_step(self, batch: list[Job]) -> Any:
        last = [time.perf_counter()]

        def on_step(i: int, total: int, sigma: float, preview: torch.Tensor) -> bool:
            now = time.perf_counter()
            self.metrics.step_seconds.observe(now - last[0])
            last[0] = now
            wall = time.time()
            with self._cond:
                for job in batch:
                    if job.done:
                        continue
                    if job.cancel_step is not None:
                        self._finish(job, "cancelled", error="cancelled by the client", code="cancelled")
                    elif job.id in self._stops:
                        job.cancel_step = job.step
                        how = self._stops[job.id]
                        self._finish(job, "cancelled", error=STOPS[how], code=how)
                    elif wall > job.deadline:
                        self._finish(job, "failed", error=_timeout_message(self.config), code="timeout",
                                     http_status=504)  # fmt: skip
                    elif self._abort:
                        self._finish(job, "failed", error="the server shut down during this job", code="shutdown",
                                     http_status=503)  # fmt: skip
                    else:
                        job.step = i + 1
                        job.emit("progress", {"step": i + 1, "total": total, "sigma": sigma})
                progress, wanted = self._progress, self._preview_wanted
                if progress is not None:
                    if progress.total is not None and i + 1 <= progress.step:  # the hires fix's second pass begins
                        progress.pass_index += 1
                    progress.step, progress.total = i + 1, total
                    self._preview_wanted = False
                done = all(job.done for job in batch)
                if done:  # the run stops here: idle for /progress before the requests are answered
                    self._progress = None
            if wanted and not done and progress is not None:
                try:
                    self._make_preview(batch, preview, progress)
                except Exception:  # noqa: BLE001 - a preview is never worth a job
                    logging.getLogger("unnoise.serve").exception("the preview could not be made")
            return done

        return on_step

    def _make_preview(self, batch: list[Job], latents: torch.Tensor, progress: Progress) -> None:
        """Decode the oldest running job's part of the sampler's current prediction of the clean latents; filtered
        and watermarked as its images will be (withheld: no preview)."""
        begin = 0
        for job in batch:
            if not job.done:
                break
            begin += job.spec.n
        image = _grid(self.pipe.decode(latents[begin : begin + job.spec.n]))
        safety = self.pipe.safety
        if safety is not None:
            image = safety.deliver(safety.finish([image])[0])
        with self._cond:
            progress.preview, progress.preview_step = image, progress.step

    def _deliver(self, job: Job, images: list[Any]) -> None:
        """Encode and store the images of a job that is still running, as the safety config delivers them: the
        pipeline has filtered, watermarked and recorded them; a withheld image fails the job with 400."""
        if job.done:
            return
        safety = self.pipe.safety
        delivered = [safety.deliver(image) if safety is not None else image for image in images]
        for i, image in enumerate(delivered):
            if image is None:
                reason = image_verdict(images[i]).reason
                self.metrics.filter_blocks.inc(stage="image")
                logging.getLogger("unnoise.serve").warning("image %d of job %s blocked: %s", i, job.id, reason)
                with self._cond:
                    message = f"image {i} was withheld by the content filter: {reason}"
                    self._finish(job, "failed", error=message, code="content_policy_violation", http_status=400)
                return
        images = delivered
        encoded = [(job.spec.seed + i, image.info["parameters"], png_bytes(image)) for i, image in enumerate(images)]
        with self._cond:
            job.step = job.spec.steps
            self._finish(job, "succeeded", images=encoded)
        self.metrics.images.inc(len(encoded))

    def _finish(self, job: Job, status: str, *, error: str | None = None, code: str | None = None,
                http_status: int | None = None, images: list[tuple[int, str, bytes]] = ()) -> None:  # fmt: skip
        """Final state of ``job`` (call with the lock held): stored, counted, announced, no longer live."""
        if job in self._queue:
            self._queue.remove(job)
        job.status, job.finished, job.images = status, time.time(), list(images)
        job.error, job.error_code, job.http_status = error, code, http_status
        self.store.finished(job.id, status, job.finished, job.step, error=error, error_code=code,
                            http_status=http_status, cancel_step=job.cancel_step, images=job.images)  # fmt: skip
        self.metrics.jobs.inc(status=status)
        self._live.pop(job.id, None)
        self._stops.pop(job.id, None)
        self._groups.pop(job.id, None)
        job.emit("done", job.record())
        job.listeners.clear()


def _grid(images: list[Image.Image]) -> Image.Image:
    return images[0] if len(images) == 1 else make_grid(images)


def _timeout_message(config: ServeConfig) -> str:
    return f"the job did not finish within the server's timeout of {config.timeout_s:g} s"


def _budget(config: ServeConfig, device: torch.device) -> int:
    """Bytes the planner may use: ``--vram-budget``, else 90% of the GPU's memory, else half the RAM."""
    if config.vram_budget_gb is not None:
        return int(config.vram_budget_gb * GIB)
    if device.type == "cuda":
        return int(0.9 * torch.cuda.get_device_properties(device).total_memory)
    return int(0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
