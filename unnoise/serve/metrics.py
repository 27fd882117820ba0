"""Prometheus metrics in the text exposition format (version 0.0.4): counters, gauges and histograms with labels.

A few dozen lines instead of a dependency: the server needs no push gateway, multiprocess mode or collectors,
only thread-safe updates from the worker thread and one ``render()`` per scrape.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STEP_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)] + ([extra] if extra else [])
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"metric {self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read at scrape time from ``read()``."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        super().__init__(name, help)
        self.read = read

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_number(self.read())}"]


class Histogram(_Metric):
    """Observations counted in cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float]):
        super().__init__(name, help)
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # the last: above every bucket
        self._sum = 0.0

    def observe(self, value: float) -> None:
        index = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines, running = self.header(), 0
        for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
            running += count
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
        return lines + [f"{self.name}_sum {_number(total)}", f"{self.name}_count {running}"]


class ServerMetrics:
    """Every metric the server exports; the gauges read the engine (and the job store: the whole queue, every
    replica's, NaN while it cannot be reached) when scraped."""

    def __init__(self, queue_depth: Callable[[], float], running: Callable[[], float], ready: Callable[[], float],
                 store_running: Callable[[], float] = lambda: math.nan,
                 store_up: Callable[[], float] = lambda: 1.0):  # fmt: skip
        self.requests = Counter(
            "unnoise_http_requests_total", "HTTP requests by route and status.", ("route", "status")
        )
        self.queue_depth = Gauge("unnoise_queue_depth", "Jobs waiting to run, in the job store (all replicas).",
                                 queue_depth)  # fmt: skip
        self.running = Gauge("unnoise_running_jobs", "Jobs in the sampler run of this server now.", running)
        self.store_running = Gauge("unnoise_store_running_jobs", "Jobs running, in the job store (all replicas).",
                                   store_running)  # fmt: skip
        self.store_up = Gauge("unnoise_store_up", "0 while this server's worker cannot reach the job store.", store_up)
        self.ready = Gauge("unnoise_ready", "1 when the model is loaded and warmed up.", ready)
        self.batch_size = Histogram("unnoise_batch_size_images", "Images per sampler run.", BATCH_SIZES)
        self.queue_seconds = Histogram("unnoise_queue_seconds", "Time from submission to the start of a job.", SECONDS)
        self.generation_seconds = Histogram(
            "unnoise_generation_seconds", "Time of one sampler run and decode.", SECONDS
        )
        self.step_seconds = Histogram("unnoise_step_seconds", "Time of one sampler step of a batch.", STEP_SECONDS)
        self.images = Counter("unnoise_images_generated_total", "Images generated and returned.")
        self.jobs = Counter("unnoise_jobs_total", "Jobs this server ended, by final status (one replica counts each).",
                           ("status",))  # fmt: skip
        self.filter_blocks = Counter("unnoise_filter_blocks_total", "Requests refused by a content filter.", ("stage",))

    def render(self) -> str:
        metrics = (self.requests, self.queue_depth, self.running, self.store_running, self.store_up, self.ready,
                   self.batch_size, self.queue_seconds, self.generation_seconds, self.step_seconds, self.images,
                   self.jobs, self.filter_blocks)  # fmt: skip
        return "\n".join(line for m in metrics for line in m.render()) + "\n"
