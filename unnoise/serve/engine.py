"""The engine: jobs go into the job store's queue (``unnoise.serve.store``); one worker thread per server claims
them in batches and runs them through the pipeline.

The worker claims (``Store.claim``) the oldest queued job and every other queued job with the same batch key (the
pipeline's: size, steps, sampler, guidance, LoRA adapters and their scales) in arrival order, up to the batch that
``--max-batch`` and the VRAM planner allow, and runs them as one sampler pass (``Pipeline.generate`` on their
resolved requests, stored with each job so that any replica can run it; it loads a LoRA of ``--lora-dir`` the first
time a request names it); while fewer images are queued than the last run had, it first waits a few milliseconds
(``batch_wait_s``) for that run's clients to come back. At each step it reports progress to each job's listeners
and drops jobs that were cancelled or ran past their deadline; when no job of the run is left, the run stops. An
exception fails the jobs of that run with 500 (a run of several jobs is first retried one job at a time, so one bad
request cannot fail the others), and the worker goes on with the next batch.

A claim is a lease: a second thread renews the leases of the running jobs every quarter lease (at most
``PROGRESS_S``), recording their steps for the other replicas and learning of cancels asked on any of them; the
result is recorded only while the lease is held (``Store.complete``), else dropped. Before each claim the worker
ends the leases that ran out (``Store.expire``: a crashed replica's jobs are queued again). A third thread follows
the unfinished jobs this replica knows but does not run (submitted or streamed here, run elsewhere) by reading the
store every ``FOLLOW_S``, so their listeners hear progress and outcome whoever runs them. While the database cannot
be reached the worker backs off and retries, a finished job waits to be recorded, and nothing accepted is lost.

With a SQLite store (``--db``, the default) the queue is this server's own: a drain runs the queued jobs too, and
queued jobs left by a stop run at the next start. With PostgreSQL (``--store``) it is shared by replicas: a drain
finishes the jobs this replica holds and leaves the rest to the others.

For AUTOMATIC1111's API the engine also keeps the running batch's progress (``progress``) and, when a client asks
for it, decodes a preview of the oldest running job between two sampler steps (the VAE never runs beside the U-Net,
and a server nobody polls decodes nothing; the safety stage's filter and watermark apply to it as to the images).
``interrupt`` and ``skip`` stop that API's running jobs at their next step, on any replica (interrupt also drops
the rest of their request's ``n_iter`` batches, as AUTOMATIC1111 does); ``switch_model`` loads another model between
batches: new jobs get 503 from the request until the jobs queued before it have run and the new model is ready.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import socket
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

from unnoise.pipeline import GenerationCancelled, Pipeline, ResolvedRequest
from unnoise.pipeline.hires import Hires, target_size
from unnoise.pipeline.png import make_grid
from unnoise.pipeline.serialize import request_from_bytes, request_to_bytes
from unnoise.safety import SafetyChecker, SafetyConfig, image_verdict
from unnoise.serve.config import ServeConfig
from unnoise.serve.jobs import Job, Listener, png_bytes
from unnoise.serve.metrics import ServerMetrics
from unnoise.serve.store import FINAL, NewJob, QueueFull, Renewal, Store, StoreUnavailable, batch_key_digest
from unnoise.serve.validation import ApiError, GenerationSpec
from unnoise.serve.vram import GIB, VramPlanner

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STOPS = {"interrupted": "interrupted by the client (AUTOMATIC1111 /interrupt)",
         "skipped": "skipped by the client (AUTOMATIC1111 /skip)"}  # fmt: skip
LOG = logging.getLogger("unnoise.serve")
PROGRESS_S = 0.25  # how often the running jobs' steps go to the store (and their leases are renewed, at the latest)
FOLLOW_S = 0.2  # how often the jobs known here but run elsewhere are read back from the store
POLL_S = 0.2  # how long an idle worker waits before it looks at the queue again (a submit here wakes it at once)
BACKOFF_S = 0.25  # the first wait after the store failed; doubled at each failure up to 5 s


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
    """``submit`` / ``cancel`` / ``follow`` / ``subscribe`` from the API (any thread); ``start`` loads the model and
    runs jobs.

    Safety is the pipeline's (``Pipeline.safety``): the checker given here, else the one ``config`` asks for, built
    by ``Pipeline.enable_safety`` once the model is loaded; none with ``config.safety`` off.
    """

    def __init__(self, config: ServeConfig, store: Store, safety: SafetyChecker | None = None):
        self.config, self.store, self._safety = config, store, safety
        self.pipe: Pipeline | None = None
        self.planner: VramPlanner | None = None
        self.ready = False
        self.load_error: str | None = None
        self.model_unusable = False  # the load failed on the model's files (a user error), not in our code
        self.draining = False
        # a SQLite file is one server's queue; a PostgreSQL one is shared by replicas (see the module's docstring)
        self.shared = store.dialect != "sqlite"
        self.worker_id = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.store_error: str | None = None  # the worker's last StoreUnavailable, None once the store answers again
        self.metrics = ServerMetrics(
            queue_depth=lambda: self._count("queued"), running=lambda: len(self._running),
            ready=lambda: float(self.ready), store_running=lambda: self._count("running"),
            store_up=lambda: float(self.store_error is None),
        )  # fmt: skip
        self._running: list[Job] = []  # the jobs of the sampler run in progress here
        self._held: set[str] = set()  # the jobs this worker holds a lease on
        self._jobs: dict[str, Job] = {}  # the unfinished jobs this replica knows: submitted, run or streamed here
        self._cond = threading.Condition()
        self._stopping = self._abort = False
        self._seconds_per_image = 1.0  # moving average, for Retry-After
        self._expected = 0  # images likely queued soon: see _await_returning_clients
        self._threads: list[threading.Thread] = []
        self.model_path = config.model  # what ``pipe`` was loaded from (``switch_model`` changes it)
        self._switch: _Switch | None = None
        self._progress: Progress | None = None
        self._preview_wanted = False

    # -- life cycle ------------------------------------------------------------------------------------------------

    def start(self, pipe: Pipeline | None = None) -> None:
        """Load the model (or use ``pipe``), warm it up and serve jobs, in background threads."""
        self._threads = [threading.Thread(target=self._main, args=(pipe,), name="unnoise-engine", daemon=True),
                         threading.Thread(target=self._keep_leases, name="unnoise-leases", daemon=True),
                         threading.Thread(target=self._follow_store, name="unnoise-follow", daemon=True)]  # fmt: skip
        for thread in self._threads:
            thread.start()

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
        fails to load (500, ``model_load_failed``). Refused (409) on a shared queue: every replica serves one model."""
        if self.shared:
            raise ApiError(409, f"the model cannot be switched to {name!r} here: this server is one of the replicas "
                           "of a shared job queue (--store), which all serve the same model; restart them with "
                           "another --model", param="sd_model_checkpoint", code="shared_queue")  # fmt: skip
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
        """Refuse new jobs (503); the accepted ones still run (on a shared queue: those this replica holds, the
        others are left to the other replicas)."""
        with self._cond:
            self.draining = True
            self._cond.notify_all()

    def idle(self) -> bool:
        """Nothing runs here, and (on a queue of its own) nothing waits."""
        with self._cond:
            if self._running or self._held:
                return False
        if self.shared:
            return True
        try:
            counts = self.store.counts()
        except StoreUnavailable:
            return False
        return counts["queued"] == 0 and counts["running"] == 0

    def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming, let the running batch finish within ``timeout`` s, then abort it: the jobs it holds go back
        to the queue (``Store.release``), for another replica or the next start. The clients waiting here on
        unfinished jobs get 503."""
        with self._cond:
            self._stopping = self.draining = True
            self._cond.notify_all()
        worker = self._threads[0] if self._threads else None
        if worker is not None:
            worker.join(timeout)
            if worker.is_alive():
                self._abort = True
                worker.join(timeout)
        with self._cond:
            held = sorted(self._held)
        if held:
            with contextlib.suppress(StoreUnavailable):  # else their leases run out: the same, a little later
                self.store.release(self.worker_id, held)
        with self._cond:
            for job in list(self._jobs.values()):
                if not job.done:
                    message = "the server shut down before this job finished here; it stays in the queue"
                    self._end_here(job, "failed", error=message, code="shutdown", http_status=503)
            self._held.clear()
        for thread in self._threads[1:]:
            thread.join(timeout)

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
        LOG.warning("prompt blocked (%s): %r", verdict.reason, prompt[:200])
        return f"category {verdict.category}: {verdict.reason}"

    def submit(self, specs: Sequence[GenerationSpec], api: str) -> list[Job]:
        """Queue one job per spec in the store, all or none: 429 with Retry-After when the queue has no room for
        them (``StoreUnavailable`` when the database cannot be reached)."""
        self.require_ready()
        now = time.time()
        jobs = [Job(uuid.uuid4().hex, api, spec, now, now + self.config.timeout_s) for spec in specs]
        for job in jobs:
            job.group_id = jobs[0].id
        new = [NewJob(job.id, api, job.spec.to_dict(), now, images=job.spec.n, deadline=job.deadline,
                      batch_key=batch_key_digest(job.spec.batch_key), group_id=job.group_id,
                      inputs=pack_request(job.spec.resolved)) for job in jobs]  # fmt: skip
        with self._cond:
            self.require_ready()
            for job in jobs:  # known before the store has them: this worker may claim them at once
                self._jobs[job.id] = job
        try:
            self.store.submit(new, max_queued=self.config.max_queue)
        except (QueueFull, StoreUnavailable) as error:
            with self._cond:
                for job in jobs:
                    self._jobs.pop(job.id, None)
            if isinstance(error, StoreUnavailable):
                raise
            raise ApiError(429, str(error), code="queue_full",
                           headers={"Retry-After": str(self.retry_after())}) from None  # fmt: skip
        with self._cond:
            self._cond.notify_all()
        return jobs

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved on: queued images times the recent seconds per image."""
        images = self.store.queued_images()
        return max(1, math.ceil(images * self._seconds_per_image / max(1, self.config.max_batch)))

    def record(self, job_id: str) -> dict[str, Any] | None:
        """The job's record: from the sampler run here if it runs here (every step), else from the store."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is not None and job.id in self._held:
                return job.record()
        return self.store.get(job_id)

    def follow(self, job_id: str) -> tuple[Job | None, dict[str, Any] | None]:
        """(the unfinished job, to ``subscribe`` to, whichever replica runs it; None if it is finished) and (its
        record if it is finished; None if there is no such job)."""
        with self._cond:
            job = self._jobs.get(job_id)
        if job is not None:
            return job, None
        record = self.store.get(job_id)
        if record is None or record["status"] in FINAL:
            return None, record
        with self._cond:
            return self._jobs.setdefault(job_id, Job.of_record(record)), None

    def cancel(self, job_id: str, *, code: str = "cancelled", reason: str = "cancelled by the client") -> str | None:
        """Cancel a job, whichever replica runs it (``Store.cancel``): "cancelled" (it was queued: ended now),
        "requested" (running: it stops at its next sampler step, a step later on another replica), "finished",
        None (no such job)."""
        step = None
        with self._cond:
            job = self._jobs.get(job_id)
            if job is not None and job.id in self._held and not job.done and job.stop is None:
                job.stop, job.cancel_step, step = (code, reason), job.step, job.step
        if step is not None:  # the store's cancel_step is its steps_done: make it this step
            self.store.progress(self.worker_id, {job_id: step})
        outcome = self.store.cancel(job_id, reason=reason, code=code)
        if outcome == "cancelled":
            self.metrics.jobs.inc(status="cancelled")
            if job is not None:
                self._settle(job, self.store.get(job_id))
        return outcome

    def interrupt(self, api: str) -> int:
        """AUTOMATIC1111's interrupt: the running jobs of ``api`` (on any replica) stop at their next sampler step,
        and the queued jobs of their requests are cancelled; returns how many jobs it stopped."""
        running = self._stop_running(api, "interrupted")
        groups = {record["group_id"] for record in self.store.find(running).values()} - {None}
        queued = [job_id for group in sorted(groups) for job_id in self.store.ids("queued", group_id=group)]
        stopped = [j for j in queued if self.cancel(j, code="interrupted", reason=STOPS["interrupted"]) is not None]
        return len(running) + len(stopped)

    def skip(self, api: str) -> int:
        """AUTOMATIC1111's skip: the running jobs of ``api`` stop at their next sampler step; the queue goes on."""
        return len(self._stop_running(api, "skipped"))

    def _stop_running(self, api: str, how: str) -> list[str]:
        running = [j for j in self.store.ids("running", api=api) if self.cancel(j, code=how, reason=STOPS[how])]
        with self._cond:
            if self._progress is not None and any(job.id in running for job in self._progress.jobs):
                setattr(self._progress, how, True)
        return running

    def progress(self, preview: bool = False) -> Progress | None:
        """The batch running here (a copy), None when idle; ``preview=True`` asks the worker for a fresh preview at
        the next step (this call returns the last one)."""
        waiting = self._count("queued")
        with self._cond:
            if self._progress is None:
                return None
            self._preview_wanted |= preview
            return dataclasses.replace(self._progress, jobs=[j for j in self._progress.jobs if not j.done],
                                       waiting=waiting)  # fmt: skip

    def waiting(self) -> int:
        """Jobs queued or running on any replica (asked while nothing runs here: one may be about to)."""
        counts = self.store.counts()
        return counts["queued"] + counts["running"]

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

    def _count(self, status: str) -> float:
        try:
            return self.store.counts()[status]
        except StoreUnavailable:
            return math.nan

    # -- following the store -------------------------------------------------------------------------------------

    def _follow_store(self) -> None:
        """Bring the jobs this replica knows but does not run up to date from the store, every ``FOLLOW_S``: their
        listeners hear their progress and outcome whichever replica runs them."""
        while not self._stopping:
            with self._cond:
                ids = [job_id for job_id, job in self._jobs.items() if job_id not in self._held and not job.ending]
                if not ids:
                    self._cond.wait(FOLLOW_S)
                    continue
            try:
                records = self.store.find(ids)
                for job_id in ids:
                    with self._cond:
                        job = self._jobs.get(job_id)
                    if job is not None and job_id in records:
                        self._settle(job, records[job_id])
            except StoreUnavailable:
                pass  # the worker reports it; the jobs are followed again once it answers
            except Exception:  # noqa: BLE001 - following must go on
                LOG.exception("following the store's jobs failed")
            with self._cond:
                self._cond.wait(FOLLOW_S)

    def _settle(self, job: Job, record: dict[str, Any] | None) -> None:
        """Take ``record`` (the store's) as the state of ``job``, which this worker does not run: announce what
        changed, and its outcome with its images if it is finished."""
        if record is None:
            return
        images = []
        if record["status"] in FINAL:
            images = [(i["seed"], i["parameters"], self.store.image(job.id, i["index"])) for i in record["images"]]
        with self._cond:
            if job.done or job.ending or job.id in self._held:
                return  # finished meanwhile, or claimed here: the worker tells its listeners
            before = (job.status, job.step)
            job.update(record)
            if record["status"] in FINAL:
                job.images = images
                self._announce(job)
                return
            if job.status != before[0]:
                job.emit("status", {"status": job.status, "batch_size": job.batch_size})
            if job.status == "running" and job.step > before[1]:
                job.emit("progress", {"step": job.step, "total": job.spec.steps, "sigma": None})

    # -- worker ----------------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        failures = 0
        while True:
            with self._cond:
                if self._stopping:
                    if self._switch is not None:
                        self._switch.error = "the server shut down before the model was switched"
                        self._switch.done.set()
                    return
                switch = self._switch
                if self.draining and self.shared:  # the queue is the other replicas' now
                    self._cond.wait(FOLLOW_S)
                    continue
            try:
                batch = self._claim()
            except Exception as error:  # noqa: BLE001 - an outage (or a bug) must not stop the worker
                failures += 1
                self._store_failed(error)
                with self._cond:
                    self._cond.wait(min(BACKOFF_S * 2 ** min(failures, 4), 5.0))
                continue
            failures, self.store_error = 0, None
            if not batch:
                if switch is not None:  # the jobs queued before it have run
                    self._run_switch(switch)
                    continue
                with self._cond:
                    self._cond.wait(POLL_S if self.shared else 1.0)  # a submit here wakes it at once
                continue
            try:
                self._execute(batch)
            finally:
                with self._cond:
                    self._running = []
                self._expected = sum(job.spec.n for job in batch) + self._queued_images()

    def _store_failed(self, error: Exception) -> None:
        if isinstance(error, StoreUnavailable):
            if self.store_error is None:
                LOG.warning("the job store is unavailable, retrying: %s", error)
            self.store_error = str(error)
        else:
            LOG.exception("the worker failed to claim jobs, retrying")

    def _queued_images(self) -> int:
        try:
            return self.store.queued_images()
        except StoreUnavailable:
            return 0

    def _claim(self) -> list[Job]:
        """End the leases that ran out, then lease the next batch to this worker."""
        self._expire()
        self._await_returning_clients()
        records = self.store.claim(self.worker_id, self._room)
        jobs, unreadable = [], []
        for record in records:
            with self._cond:
                job = self._jobs.get(record["id"])
            if job is None or job.spec.resolved is None:  # submitted elsewhere, or followed from here
                fresh = Job.of_record(record)
                try:
                    fresh.spec = dataclasses.replace(fresh.spec, resolved=unpack_request(record["inputs"]))
                except Exception as error:  # noqa: BLE001 - written by another unnoise version, or damaged
                    unreadable.append((fresh, f"the job's stored request cannot be read: {type(error).__name__}: "
                                       f"{error}"))  # fmt: skip
                if job is not None:
                    fresh.listeners = job.listeners
                job = fresh
            jobs.append(job)
        with self._cond:
            for job, record in zip(jobs, records, strict=True):
                job.update(record)
                job.stop, job.ending, job.images = None, False, []
                self._jobs[job.id] = job
                self._held.add(job.id)
            for job, _ in unreadable:
                job.ending = True
                jobs.remove(job)
            self._running = jobs
        for job, message in unreadable:
            self._end(job, "failed", error=message, code="generation_error", http_status=500)
        return jobs

    def _expire(self) -> None:
        """``Store.expire``, counting the jobs it ends (each job's end is counted by the one replica that ends it)."""
        for status in self.store.expire().values():
            if status in FINAL:
                self.metrics.jobs.inc(status=status)

    def _room(self, head: dict[str, Any]) -> int:
        """Images a run led by the job ``head`` (a store record) may have: the VRAM planner's batch at its largest
        pass's size (a job alone was checked at submit)."""
        spec = head["spec"]
        size = spec["width"], spec["height"]
        if spec.get("hires") is not None:
            size = target_size(Hires(**spec["hires"]), *size)[0]
        return max(self.planner.max_batch(*size), head["n_images"])

    def _await_returning_clients(self) -> None:
        """Wait up to ``batch_wait_s`` while fewer images are queued than were queued or running at the end of the
        last batch.

        The clients of the last batch send their next requests a few milliseconds after their answers; starting
        at once would run those already queued without them, and so on: batches that never grow.
        """
        deadline = time.monotonic() + self.config.batch_wait_s
        expected = min(self._expected, self.config.max_batch)  # no need to wait for more than one batch takes
        while not self._stopping and self.store.queued_images() < expected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with self._cond:
                self._cond.wait(remaining)

    def _keep_leases(self) -> None:
        """Every ``lease_s`` / 4 (at most ``PROGRESS_S``), renew the leases of the jobs running here and record their
        steps (``Store.progress``): a long step never outlives a lease, other replicas see the progress, and a
        cancel asked on any replica comes back here. A job whose lease was lost is dropped from the run. Every half
        lease while a batch runs, ``Store.expire`` too."""
        interval = min(PROGRESS_S, self.store.lease_s / 4)
        expired = time.monotonic()
        while not self._stopping or self._held:
            if self._running and time.monotonic() - expired > self.store.lease_s / 2:
                # the worker expires leases before it claims; while it runs a batch this does, so that a crashed
                # replica's jobs are queued again within a lease (and read so) and another worker may take them
                expired = time.monotonic()
                with contextlib.suppress(StoreUnavailable):
                    self._expire()
            with self._cond:
                steps = {job.id: job.step for job in self._jobs.values() if job.id in self._held and not job.ending}
            if steps:
                try:
                    renewal = self.store.progress(self.worker_id, steps)
                except StoreUnavailable:
                    renewal = None  # the worker reports it; the leases may lapse meanwhile
                except Exception:  # noqa: BLE001 - the leases must go on being renewed
                    LOG.exception("renewing the leases failed")
                    renewal = None
                if renewal is not None:
                    self._renewed(steps, renewal)
            if self._abort and self._stopping:
                return
            time.sleep(interval)

    def _renewed(self, asked: dict[str, int], renewal: Renewal) -> None:
        with self._cond:
            for job_id in asked:
                job = self._jobs.get(job_id)
                if job is None or job.ending or job.done or job_id not in self._held:
                    continue
                if job_id not in renewal.held:
                    LOG.warning("job %s: this worker's lease ran out (another worker may run it); dropped here", job_id)
                    self._held.discard(job_id)
                    job.status = "queued"
                elif job_id in renewal.cancel and job.stop is None:
                    job.stop = renewal.cancel[job_id]
                    if job.cancel_step is None:
                        job.cancel_step = job.step

    def _active(self, job: Job) -> bool:
        """Still part of the run here: not finished, not being recorded, lease held."""
        return not job.done and not job.ending and job.id in self._held

    def _execute(self, batch: list[Job]) -> None:
        """Run ``batch``; if it raises, rerun its jobs one at a time so the failure stays with its job."""
        try:
            self._run(batch)
        except Exception as error:  # noqa: BLE001 - a request must never take the worker down
            traceback.print_exc(file=sys.stderr)
            with self._cond:
                active = [job for job in batch if self._active(job)]
            if len(active) > 1:
                for job in active:
                    self._execute([job])
                return
            message = f"generation failed: {type(error).__name__}: {error}"
            for job in active:
                self._end(job, "failed", error=message, code="generation_error", http_status=500)

    def _run(self, batch: list[Job]) -> None:
        started = time.time()
        images = sum(job.spec.n for job in batch)
        queued = self._count("queued")
        waiting = 0 if math.isnan(queued) else int(queued)
        with self._cond:
            passes = 2 if batch[0].spec.hires is not None else 1
            self._progress = Progress(list(batch), waiting, started, passes)
            self._preview_wanted = False
            for job in batch:
                job.status, job.batch_size, job.step = "running", images, 0
                self.metrics.queue_seconds.observe(started - job.created)
                job.emit("status", {"status": "running", "batch_size": images})
        self.metrics.batch_size.observe(images)
        try:
            results = self.pipe.generate([job.spec.resolved for job in batch], self._on_step(batch))
        except GenerationCancelled:
            return  # every job of the run was ended by the step callback
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
            ends = []
            with self._cond:
                for job in batch:
                    if not self._active(job):
                        continue
                    if job.stop is not None:
                        ends.append((job, "cancelled", dict(error=job.stop[1], code=job.stop[0])))
                    elif wall > job.deadline:
                        ends.append((job, "failed", dict(error=_timeout_message(self.config), code="timeout",
                                                          http_status=504)))  # fmt: skip
                    elif self._abort:
                        ends.append((job, "released", {}))
                    else:
                        job.step = i + 1
                        job.emit("progress", {"step": i + 1, "total": total, "sigma": sigma})
                for job, _, _ in ends:
                    job.ending = True
                progress, wanted = self._progress, self._preview_wanted
                if progress is not None:
                    if progress.total is not None and i + 1 <= progress.step:  # the hires fix's second pass begins
                        progress.pass_index += 1
                    progress.step, progress.total = i + 1, total
                    self._preview_wanted = False
                done = not any(self._active(job) for job in batch)
                if done:  # the run stops here: idle for /progress before the requests are answered
                    self._progress = None
            for job, status, fields in ends:
                if status == "released":
                    self._release(job)
                else:
                    self._end(job, status, **fields)
            if wanted and not done and progress is not None:
                try:
                    self._make_preview(batch, preview, progress)
                except Exception:  # noqa: BLE001 - a preview is never worth a job
                    LOG.exception("the preview could not be made")
            return done

        return on_step

    def _make_preview(self, batch: list[Job], latents: torch.Tensor, progress: Progress) -> None:
        """Decode the oldest running job's part of the sampler's current prediction of the clean latents; filtered
        and watermarked as its images will be (withheld: no preview)."""
        begin = 0
        for job in batch:
            if self._active(job):
                break
            begin += job.spec.n
        image = _grid(self.pipe.decode(latents[begin : begin + job.spec.n]))
        safety = self.pipe.safety
        if safety is not None:
            image = safety.deliver(safety.finish([image])[0])
        with self._cond:
            progress.preview, progress.preview_step = image, progress.step

    def _deliver(self, job: Job, images: list[Any]) -> None:
        """Encode and record the images of a job still running here, as the safety config delivers them: the
        pipeline has filtered, watermarked and recorded them; a withheld image fails the job with 400."""
        with self._cond:
            if not self._active(job):
                return
            job.ending = True
        safety = self.pipe.safety
        delivered = [safety.deliver(image) if safety is not None else image for image in images]
        for i, image in enumerate(delivered):
            if image is None:
                reason = image_verdict(images[i]).reason
                self.metrics.filter_blocks.inc(stage="image")
                LOG.warning("image %d of job %s blocked: %s", i, job.id, reason)
                message = f"image {i} was withheld by the content filter: {reason}"
                self._end(job, "failed", error=message, code="content_policy_violation", http_status=400)
                return
        encoded = [(job.spec.seed + i, image.info["parameters"], png_bytes(image)) for i, image in enumerate(delivered)]
        job.step = job.spec.steps
        if self._end(job, "succeeded", images=encoded):
            self.metrics.images.inc(len(encoded))

    def _end(self, job: Job, status: str, *, error: str | None = None, code: str | None = None,
             http_status: int | None = None, images: list[tuple[int, str, bytes]] = ()) -> bool:  # fmt: skip
        """Record the outcome of a job run here (call without the lock): in the store if this worker still holds
        its lease (waiting out an outage), then for its listeners. False if the lease was lost: the result is
        dropped, the job is another worker's (or queued again), and this replica goes on following it."""
        failures = 0
        while True:
            try:
                recorded = self.store.complete(self.worker_id, job.id, status, steps_done=job.step, error=error,
                                               error_code=code, http_status=http_status, images=images)  # fmt: skip
                break
            except StoreUnavailable as unavailable:
                failures += 1
                self._store_failed(unavailable)
                if self._abort:
                    recorded = False  # its lease runs out: queued again, for another replica or the next start
                    break
                time.sleep(min(BACKOFF_S * 2 ** min(failures, 4), 5.0))
        with self._cond:
            self._held.discard(job.id)
            if not recorded:
                LOG.warning("job %s: its lease was lost before its result (%s) was recorded; the result is dropped",
                            job.id, status)  # fmt: skip
                job.ending, job.status = False, "queued"
                return False
            job.status, job.finished, job.images = status, time.time(), list(images)
            job.error, job.error_code, job.http_status = error, code, http_status
            self.metrics.jobs.inc(status=status)
            self._announce(job)
        return True

    def _release(self, job: Job) -> None:
        """Hand a job back to the queue unfinished (shutting down)."""
        with contextlib.suppress(StoreUnavailable):
            self.store.release(self.worker_id, [job.id])
        with self._cond:
            self._held.discard(job.id)
            job.ending = False

    def _end_here(self, job: Job, status: str, **fields: Any) -> None:
        """Tell the listeners here that ``job`` ends for them (the store keeps it; call with the lock held)."""
        job.status, job.finished = status, time.time()
        job.error, job.error_code, job.http_status = fields["error"], fields["code"], fields["http_status"]
        self._jobs.pop(job.id, None)
        job.emit("done", job.record())
        job.listeners.clear()

    def _announce(self, job: Job) -> None:
        """A finished job (call with the lock held): announced, no longer followed."""
        self._jobs.pop(job.id, None)
        job.emit("done", job.record())
        job.listeners.clear()


def pack_request(resolved: ResolvedRequest) -> bytes:
    """A resolved request as ``NewJob.inputs``: any replica runs it as it was resolved (safetensors and JSON, its
    tensors and images included; reading it back runs no code)."""
    return request_to_bytes(resolved)


def unpack_request(inputs: bytes | None) -> ResolvedRequest:
    if inputs is None:
        raise ValueError("the job has no stored request (inputs) to run")
    return request_from_bytes(inputs)


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
