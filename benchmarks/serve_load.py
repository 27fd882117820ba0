"""Load test of `unnoise serve` over loopback: C concurrent clients, R requests each, for each C given.

    python benchmarks/serve_load.py                          # the default model, C = 1 and 8, R = 6
    python benchmarks/serve_load.py --tiny --requests 3      # a random tiny model: checks the script itself
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --concurrency 1 4 8
    python benchmarks/serve_load.py --vram-check             # the VRAM planner against measured peaks
    python benchmarks/serve_load.py --replicas 1 2 --threads 1 --concurrency 8   # replicas on one PostgreSQL

Without --url it starts `python -m unnoise.serve` on a free loopback port and stops it after. Each client sends
OpenAI-style requests (`/v1/images/generations`, b64_json) with its own prompt and the model's default settings,
one after another. Only loopback addresses are accepted, every level is bounded by --requests and --time-limit,
and each request by --request-timeout. Reported per level: images/s, latency p50/p95/p99, the server's batch
sizes (its X-Batch-Size header), status counts, and lost requests (neither an image nor 429/503). --check exits 1
unless nothing was lost, nothing was 5xx and throughput at the largest C is at least twice that at C = 1.

With --replicas N [N ...] it starts, for each N in turn, N servers on one PostgreSQL store (--store, or a fresh
database in a throwaway cluster started from Debian's postgresql binaries as the tests do), and client i sends to
replica i mod N; whichever replica claims a job runs it. Each level also reports the images each replica sampled,
and the run ends with the throughput at the largest C of each N against the first N. --check then asks only that
nothing was lost and nothing was 5xx.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ipaddress
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unnoise.serve.config import DEFAULT_MODEL  # noqa: E402

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def loopback_url(url: str) -> str:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"--url {url}: only loopback addresses (127.0.0.0/8, localhost, [::1]) are allowed")
    return url.rstrip("/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_servers(model: Path, max_batch: int, threads: int | None, replicas: int = 1, store: str | None = None):
    """Start ``replicas`` servers on free loopback ports (in parallel), on ``store`` (a PostgreSQL URL) or, for one
    replica without a store, a fresh SQLite file; yield their base URLs once every one is ready."""
    if replicas > 1 and store is None:
        raise ValueError("several replicas need a shared store: pass a postgresql:// URL")
    ports = [free_port() for _ in range(replicas)]
    common = [sys.executable, "-m", "unnoise.serve", "--model", str(model), "--max-batch", str(max_batch),
              "--max-queue", "256"]  # fmt: skip
    common += ["--threads", str(threads)] if threads else []
    common += ["--store", store] if store else ["--db", str(Path(tempfile.mkdtemp()) / "load.sqlite3")]
    processes = [subprocess.Popen([*common, "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for port in ports]  # fmt: skip
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        deadline = time.monotonic() + 300
        for base, process in zip(bases, processes, strict=True):
            while time.monotonic() < deadline and process.poll() is None:
                with contextlib.suppress(requests.ConnectionError):
                    if requests.get(f"{base}/ready", timeout=5).ok:
                        break
                time.sleep(0.25)
            else:
                raise SystemExit(f"the server at {base} did not get ready (exit status {process.poll()})")
        yield bases
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(60)


@contextlib.contextmanager
def throwaway_postgres():
    """A PostgreSQL cluster in a temporary folder (the tests' ``pg_cluster``, on a Unix socket), removed at the
    end; yields a function that creates a fresh database in it and returns its URL."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pg_cluster import PostgresCluster

    names = (f"serve_load_{k}" for k in range(1_000_000))
    with PostgresCluster(port=free_port()) as cluster:
        yield lambda: cluster.create_database(next(names))


def client(base: str, index: int, count: int, body: dict, stop_at: float, timeout: float, out: list) -> None:
    with requests.Session() as session:
        for k in range(count):
            if time.monotonic() > stop_at:
                return
            payload = {**body, "prompt": f"a handwritten {DIGITS[(index + k) % 10]}"}
            start = time.perf_counter()
            try:
                r = session.post(f"{base}/v1/images/generations", json=payload, timeout=timeout)
                status, batch = r.status_code, r.headers.get("X-Batch-Size")
                images = len(r.json().get("data", [])) if r.status_code == 200 else 0
            except requests.RequestException as error:
                status, batch, images = type(error).__name__, None, 0
            out.append({"status": status, "latency": time.perf_counter() - start, "batch": batch, "images": images})


def run_level(bases: list[str], concurrency: int, count: int, body: dict, time_limit: float, timeout: float,
              ) -> dict:  # fmt: skip
    """``concurrency`` clients, client i sending to ``bases[i % len(bases)]`` (round robin over the replicas)."""
    results: list[dict] = []
    stop_at = time.monotonic() + time_limit
    threads = [threading.Thread(target=client, args=(bases[i % len(bases)], i, count, body, stop_at, timeout,
                                                     results)) for i in range(concurrency)]  # fmt: skip
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    latencies = sorted(r["latency"] for r in ok)
    statuses = collections.Counter(str(r["status"]) for r in results)
    lost = sum(1 for r in results if r["status"] not in (200, 429, 503))
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "images_per_s": sum(r["images"] for r in ok) / wall,
        "wall_s": wall,
        "p50_s": _quantile(latencies, 0.50),
        "p95_s": _quantile(latencies, 0.95),
        "p99_s": _quantile(latencies, 0.99),
        "batch_sizes": dict(sorted(collections.Counter(int(r["batch"]) for r in ok if r["batch"]).items())),
        "statuses": dict(sorted(statuses.items())),
        "lost": lost,
        "server_errors": sum(1 for r in results if isinstance(r["status"], int) and r["status"] >= 500),
    }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def table(levels: list[dict]) -> str:
    head = ("| replicas | C | requests | images/s | p50 s | p95 s | p99 s | batch sizes (images: requests) | statuses "
            "| lost | images sampled by each replica |")  # fmt: skip
    rows = [head, "|" + "---|" * 11]
    for r in levels:
        batches = ", ".join(f"{k}: {v}" for k, v in r["batch_sizes"].items())
        statuses = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())
        p = [f"{r[k]:.3f}" if r[k] is not None else "-" for k in ("p50_s", "p95_s", "p99_s")]
        shares = ", ".join(f"{n:g}" for n in r["images_by_replica"])
        rows.append(f"| {r['replicas']} | {r['concurrency']} | {r['requests']} | {r['images_per_s']:.2f} | "
                    f"{' | '.join(p)} | {batches} | {statuses} | {r['lost']} | {shares} |")  # fmt: skip
    return "\n".join(rows)


def vram_check(model: Path, sizes: list[int]) -> None:
    """Estimated against measured activation peak of whole generations (2 steps) at batch 1, 2, 4, 8."""
    import torch

    from unnoise import Pipeline
    from unnoise.serve.vram import GIB, VramPlanner, measured_activations

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = Pipeline.from_pretrained(model, device=device, dtype=torch.float16 if device == "cuda" else None)
    planner = VramPlanner(pipe, budget=2**50, max_batch=64)
    pipe("warm-up", steps=2, seed=0)  # as the server does: one-off allocations (cuBLAS workspace) are not a batch's
    print(f"{model.name} on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; weights "
          f"{planner.weights / GIB:.3f} GiB")  # fmt: skip
    print("| size | batch | estimated activations MiB | measured MiB | estimate / measured |\n|---|---|---|---|---|")
    for size in sizes:
        for batch in (1, 2, 4, 8):
            estimate = planner.estimate(batch, size, size)
            measured = measured_activations(
                lambda b=batch, s=size: pipe("a handwritten seven", num_images=b, steps=2, width=s, height=s, seed=0),
                device,
            )
            ratio = estimate.activations / measured if measured else float("nan")
            print(f"| {size} | {batch} | {estimate.activations / 2**20:.1f} | {measured / 2**20:.1f} | {ratio:.2f} |")


def images_sampled(base: str) -> float:
    """The images this replica ran through its sampler so far (its ``unnoise_batch_size_images`` sum)."""
    text = requests.get(f"{base}/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith("unnoise_batch_size_images_sum"):
            return float(line.split()[-1])
    return 0.0


def run_levels(bases: list[str], args: argparse.Namespace, body: dict) -> list[dict]:
    """The warm-up (not reported), then each concurrency level; with several replicas each level records how many
    images each replica sampled."""
    run_level(bases, max(2, len(bases)), 1, body, args.time_limit, args.request_timeout)
    levels = []
    for concurrency in args.concurrency:
        before = [images_sampled(b) for b in bases]
        level = run_level(bases, concurrency, args.requests, body, args.time_limit, args.request_timeout)
        level["replicas"] = len(bases)
        level["images_by_replica"] = [images_sampled(b) - n for b, n in zip(bases, before, strict=True)]
        levels.append(level)
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running server (loopback only); default: start one")
    parser.add_argument("--model", type=Path, help="model folder for the started server (default: the embedded one)")
    parser.add_argument("--tiny", action="store_true", help="serve a random tiny model (checks the script)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], metavar="C")
    parser.add_argument("--requests", type=int, default=6, metavar="R", help="requests per client (default: 6)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    parser.add_argument("--max-batch", type=int, default=8, help="the started server's --max-batch (default: 8)")
    parser.add_argument("--threads", type=int, help="the started server's --threads (default: torch's)")
    parser.add_argument(
        "--replicas",
        type=int,
        nargs="+",
        metavar="N",
        help="start N replicas on one PostgreSQL "
        "store, for each N given (the clients take turns among them); default: one server on SQLite",
    )
    parser.add_argument(
        "--store",
        metavar="URL",
        help="the replicas' postgresql:// store (each N empties nothing: "
        "give a fresh database); default: a throwaway cluster with a fresh database per N",
    )
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per level at most (default: 300)")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request at most")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the acceptance criteria hold")
    parser.add_argument("--vram-check", action="store_true", help="compare the VRAM planner with measured peaks")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="--vram-check sizes")
    args = parser.parse_args()
    if args.url and args.replicas:
        parser.error("--url and --replicas: give one (--url measures a running server, --replicas starts them)")

    model = args.model or DEFAULT_MODEL
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_serve import build_tiny_pipeline

        model = build_tiny_pipeline(Path(tempfile.mkdtemp()) / "tiny")
    if args.vram_check:
        vram_check(model, args.sizes)
        return
    body = {"n": 1, "response_format": "b64_json", **({"steps": args.steps} if args.steps else {})}
    if args.replicas:
        runs = {}
        databases = contextlib.nullcontext(lambda: args.store) if args.store else throwaway_postgres()
        with databases as database:
            for n in args.replicas:
                with local_servers(model, args.max_batch, args.threads, n, database()) as bases:
                    runs[n] = run_levels(bases, args, body)
        levels = [level for n in args.replicas for level in runs[n]]
    else:
        server = (contextlib.nullcontext([loopback_url(args.url)]) if args.url
                  else local_servers(model, args.max_batch, args.threads))  # fmt: skip
        with server as bases:
            levels = run_levels(bases, args, body)
    print(table(levels))
    summary = {"levels": levels, "model": str(model)}
    if args.replicas:
        top = max(args.concurrency)
        at_top = {r["replicas"]: r["images_per_s"] for r in levels if r["concurrency"] == top}
        base = at_top[args.replicas[0]]
        summary["replica_speedup"] = {n: v / base if base else 0.0 for n, v in at_top.items()}
        for n, ratio in summary["replica_speedup"].items():
            print(f"throughput at C={top}, {n} replica(s) / {args.replicas[0]}: {ratio:.2f}x")
    else:
        speedup = levels[-1]["images_per_s"] / levels[0]["images_per_s"] if levels[0]["images_per_s"] else 0.0
        summary["speedup"] = speedup
        print(f"throughput C={levels[-1]['concurrency']} / C={levels[0]['concurrency']}: {speedup:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if args.check:
        failed = [(r["replicas"], r["concurrency"]) for r in levels if r["lost"] or r["server_errors"]]
        if failed:
            raise SystemExit(f"check failed: lost or 5xx at (replicas, C) = {failed}")
        if not args.replicas and summary["speedup"] < 2.0:
            raise SystemExit(f"check failed: speedup {summary['speedup']:.2f}x (needs 2x)")


if __name__ == "__main__":
    main()
