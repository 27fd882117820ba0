"""Load test of `unnoise serve` over loopback: C concurrent clients, R requests each, for each C given.

    python benchmarks/serve_load.py                          # the default model, C = 1 and 8, R = 6
    python benchmarks/serve_load.py --tiny --requests 3      # a random tiny model: checks the script itself
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --concurrency 1 4 8
    python benchmarks/serve_load.py --vram-check             # the VRAM planner against measured peaks

Without --url it starts `python -m unnoise.serve` on a free loopback port and stops it after. Each client sends
OpenAI-style requests (`/v1/images/generations`, b64_json) with its own prompt and the model's default settings,
one after another. Only loopback addresses are accepted, every level is bounded by --requests and --time-limit,
and each request by --request-timeout. Reported per level: images/s, latency p50/p95/p99, the server's batch
sizes (its X-Batch-Size header), status counts, and lost requests (neither an image nor 429/503). --check exits 1
unless nothing was lost, nothing was 5xx and throughput at the largest C is at least twice that at C = 1.
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


@contextlib.contextmanager
def local_server(model: Path, max_batch: int, threads: int | None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = Path(tempfile.mkdtemp()) / "load.sqlite3"
    command = [sys.executable, "-m", "unnoise.serve", "--model", str(model), "--port", str(port), "--db", str(db),
               "--max-batch", str(max_batch), "--max-queue", "256"]  # fmt: skip
    command += ["--threads", str(threads)] if threads else []
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{base}/ready", timeout=5).ok:
                    break
            time.sleep(0.25)
        else:
            raise SystemExit(f"the server did not get ready (exit status {process.poll()})")
        yield base
    finally:
        process.terminate()
        process.wait(60)


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


def run_level(base: str, concurrency: int, count: int, body: dict, time_limit: float, timeout: float) -> dict:
    results: list[dict] = []
    stop_at = time.monotonic() + time_limit
    threads = [threading.Thread(target=client, args=(base, i, count, body, stop_at, timeout, results))
               for i in range(concurrency)]  # fmt: skip
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
    head = "| C | requests | images/s | p50 s | p95 s | p99 s | batch sizes (images: requests) | statuses | lost |"
    rows = [head, "|" + "---|" * 9]
    for r in levels:
        batches = ", ".join(f"{k}: {v}" for k, v in r["batch_sizes"].items())
        statuses = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())
        p = [f"{r[k]:.3f}" if r[k] is not None else "-" for k in ("p50_s", "p95_s", "p99_s")]
        rows.append(f"| {r['concurrency']} | {r['requests']} | {r['images_per_s']:.2f} | {' | '.join(p)} | {batches} "
                    f"| {statuses} | {r['lost']} |")  # fmt: skip
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
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per level at most (default: 300)")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request at most")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the acceptance criteria hold")
    parser.add_argument("--vram-check", action="store_true", help="compare the VRAM planner with measured peaks")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="--vram-check sizes")
    args = parser.parse_args()

    model = args.model or DEFAULT_MODEL
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_serve import build_tiny_pipeline

        model = build_tiny_pipeline(Path(tempfile.mkdtemp()) / "tiny")
    if args.vram_check:
        vram_check(model, args.sizes)
        return
    body = {"n": 1, "response_format": "b64_json", **({"steps": args.steps} if args.steps else {})}
    server = contextlib.nullcontext(loopback_url(args.url)) if args.url else local_server(model, args.max_batch,
                                                                                         args.threads)  # fmt: skip
    with server as base:
        run_level(base, 1, 2, body, args.time_limit, args.request_timeout)  # warm-up, not reported
        levels = [run_level(base, c, args.requests, body, args.time_limit, args.request_timeout)
                  for c in args.concurrency]  # fmt: skip
    print(table(levels))
    speedup = levels[-1]["images_per_s"] / levels[0]["images_per_s"] if levels[0]["images_per_s"] else 0.0
    print(f"throughput C={levels[-1]['concurrency']} / C={levels[0]['concurrency']}: {speedup:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"levels": levels, "speedup": speedup, "model": str(model)}, indent=2))
    if args.check:
        failed = [r for r in levels if r["lost"] or r["server_errors"]]
        if failed or speedup < 2.0:
            raise SystemExit(f"check failed: lost or 5xx at C={[r['concurrency'] for r in failed]}, "
                             f"speedup {speedup:.2f}x (needs 2x)")  # fmt: skip


if __name__ == "__main__":
    main()
