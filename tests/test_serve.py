"""HTTP serving against live servers on 127.0.0.1: ``python -m unnoise.serve`` in a subprocess (the CLI path,
SIGTERM) and uvicorn in a thread (failure injection, filters, keys, timeouts). The model is the embedded default
when it is built, else a tiny random one of the same shape (32x32, MiniLM, latent factor 8)."""

import base64
import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from helpers import free_port
from PIL import Image

from unnoise import Pipeline
from unnoise.models.text import MiniLMEncoder
from unnoise.models.unet import UNet, UNetConfig
from unnoise.models.vae import AutoencoderKL, AutoencoderKLConfig
from unnoise.pipeline import Request
from unnoise.pipeline.config import PipelineConfig, SamplingConfig, TextEncoderConfig
from unnoise.pipeline.png import parse_parameters
from unnoise.safety import ImageVerdict, SafetyChecker, SafetyConfig, Verdict
from unnoise.serve.config import DEFAULT_MODEL, ServeConfig

ROOT = Path(__file__).resolve().parents[1]
BUDGET_GB = 0.5  # 32x32 batches fit; 1024x1024 with n=4 does not (VRAM planner, 413)


# -- models and servers ------------------------------------------------------------------------------------------


def build_tiny_pipeline(folder: Path) -> Path:
    """A random pipeline with the default model's interface: MiniLM (384 wide, 16 tokens), 1-channel 32x32."""
    if (folder / "pipeline.json").is_file():
        return folder
    torch.manual_seed(0)
    unet = UNet(UNetConfig(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=8, cross_attention_dim=384, norm_num_groups=8,
    ))  # fmt: skip
    vae = AutoencoderKL(AutoencoderKLConfig(
        in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
        norm_num_groups=8, sample_size=32,
    ))  # fmt: skip
    config = PipelineConfig(
        text_encoder=TextEncoderConfig(max_length=16),
        sampling=SamplingConfig(sampler="euler", steps=4, guidance_scale=2.0),
    )
    Pipeline(unet.eval(), vae.eval(), MiniLMEncoder.from_package(max_length=16), config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.getbasetemp() / "serve-tiny-model")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model) -> Pipeline:
    return Pipeline.from_pretrained(tiny_model)


def wait_ready(base: str, timeout: float = 90.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {process.stderr.read()}")
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(f"{base}/ready", timeout=5).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{base} not ready after {timeout} s")


def start_process(args: list[str], port: int) -> subprocess.Popen:
    """``python -m unnoise.serve ARGS`` on one thread (a shared 2-core machine), its log on stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "unnoise.serve", "--port", str(port), *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """The CLI's server: $UNNOISE_TEST_SERVE_MODEL, else the default model when it is built, else the tiny one."""
    port = free_port()
    model_args = [] if (DEFAULT_MODEL / "pipeline.json").is_file() else ["--model", str(tiny_model)]
    if os.environ.get("UNNOISE_TEST_SERVE_MODEL"):
        model_args = ["--model", os.environ["UNNOISE_TEST_SERVE_MODEL"]]
    db = tmp_path_factory.mktemp("serve") / "jobs.sqlite3"
    args = [*model_args, "--db", str(db), "--max-steps", "1000", "--max-batch", "4", "--max-queue", "6",
            "--vram-budget", str(BUDGET_GB)]  # fmt: skip
    process = start_process(args, port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process=process)
        yield base
    finally:
        stop_process(process)


class ThreadServer:
    """uvicorn in a thread of this process, serving ``create_app(config, ...)`` on a free port."""

    def __init__(self, config: ServeConfig, **app_kwargs):
        import uvicorn

        from unnoise.serve.app import create_app

        self.app = create_app(config, **app_kwargs)
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        uv = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(uv)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        wait_ready(self.base, timeout=60)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def thread_server(tiny_pipe, tmp_path):
    """Factory: ``with thread_server(**ServeConfig fields, checker=SafetyChecker, pipe=...) as s: s.base``; safety
    is off unless ``safety=True`` or a ``checker`` is given."""

    def make(checker=None, pipe=None, **fields) -> ThreadServer:
        fields = {"db": tmp_path / f"jobs-{time.monotonic_ns()}.sqlite3", "warmup": False, "max_steps": 1000,
                  "safety": False, **fields}  # fmt: skip
        return ThreadServer(ServeConfig(model=Path("unused"), **fields), safety=checker, pipe=pipe or tiny_pipe)

    return make


# -- helpers -------------------------------------------------------------------------------------------------------


def png_parameters(data: bytes) -> dict:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return parse_parameters(image.info["parameters"])


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64) / 255


def post(base: str, path: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(f"{base}{path}", json=body, timeout=120, **kwargs)


def wait_job(base: str, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{base}/v1/jobs/{job_id}", timeout=10).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise TimeoutError(job_id)


def events(base: str, job_id: str):
    """(event, data) from the job's Server-Sent Events until ``done``."""
    with requests.get(f"{base}/v1/jobs/{job_id}/events", stream=True, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                yield name, json.loads(line[6:])
                if name == "done":
                    return


def wait_running(base: str, job_id: str, min_step: int = 1) -> int:
    for name, data in events(base, job_id):
        if name == "progress" and data["step"] >= min_step:
            return data["step"]
    raise AssertionError(f"job {job_id} finished before step {min_step}")


# -- acceptance 1: images, parameters, compatibility ---------------------------------------------------------------


def test_health_ready_and_page(server):
    assert requests.get(f"{server}/health", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{server}/ready", timeout=10).json()
    assert ready["status"] == "ready" and len(ready["model_hash"]) == 10
    page = requests.get(f"{server}/", timeout=10)
    assert page.headers["content-type"].startswith("text/html") and 'id="progress"' in page.text


def test_openai_images_are_pngs_with_parameters(server):
    body = {"prompt": "a handwritten seven", "n": 2, "size": "32x32", "response_format": "b64_json", "seed": 40,
            "steps": 5, "negative_prompt": "blurry", "sampler": "euler_a", "guidance_scale": 3.0}  # fmt: skip
    response = post(server, "/v1/images/generations", body)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    params = [png_parameters(base64.b64decode(item["b64_json"])) for item in data]
    assert [p["seed"] for p in params] == [40, 41]
    first = params[0]
    assert (first["prompt"], first["negative_prompt"], first["steps"], first["sampler"]) == (
        "a handwritten seven", "blurry", 5, "euler_a")  # fmt: skip
    assert (first["width"], first["height"], first["guidance_scale"]) == (32, 32, 3.0)
    assert (first["batch_size"], first["batch_pos"]) == (2, 0)


def test_openai_url_format_serves_the_png(server):
    response = post(server, "/v1/images/generations", {"prompt": "a three", "steps": 3})
    assert response.status_code == 200, response.text
    url = response.json()["data"][0]["url"]
    assert url.startswith(server) and url.endswith(".png")
    image = requests.get(url, timeout=10)
    assert image.headers["content-type"] == "image/png"
    assert png_parameters(image.content)["steps"] == 3


def test_openai_client_works_unchanged(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(prompt="a four", n=1, size="32x32", response_format="b64_json",
                                    extra_body={"seed": 7, "steps": 3})  # fmt: skip
    assert png_parameters(base64.b64decode(result.data[0].b64_json))["seed"] == 7
    with pytest.raises(openai.UnprocessableEntityError) as error:
        client.images.generate(prompt="a four", n=99)
    assert error.value.body["param"] == "n"


def test_a1111_txt2img(server):
    body = {"prompt": "a five", "negative_prompt": "", "steps": 3, "cfg_scale": 2.5, "sampler_name": "Euler a",
            "seed": 5, "width": 32, "height": 32, "batch_size": 2, "n_iter": 2, "restore_faces": False}  # fmt: skip
    response = post(server, "/sdapi/v1/txt2img", body)
    assert response.status_code == 200, response.text
    result = response.json()
    info = json.loads(result["info"])
    assert info["all_seeds"] == [5, 6, 7, 8] and info["sampler_name"] == "Euler a"
    params = [png_parameters(base64.b64decode(image)) for image in result["images"]]
    assert [p["seed"] for p in params] == [5, 6, 7, 8]
    assert [p["batch_pos"] for p in params] == [0, 1, 0, 1]  # within each of the n_iter batches
    assert params[0]["sampler"] == "euler_a" and params[0]["guidance_scale"] == 2.5
    assert [parse_parameters(text)["seed"] for text in info["infotexts"]] == [5, 6, 7, 8]
    assert result["parameters"]["prompt"] == "a five"


def test_batched_images_equal_unbatched(server):
    """Jobs queued behind a long one run as one batch; each image equals the one generated alone."""
    blocker = post(server, "/v1/jobs", {"prompt": "blocker", "steps": 1000}).json()
    wait_running(server, blocker["id"])
    specs = [{"prompt": p, "seed": s, "steps": 4, "n": n} for p, s, n in (("a one", 1, 1), ("a two", 20, 2))]
    batched = [post(server, "/v1/jobs", spec).json()["id"] for spec in specs]
    requests.delete(f"{server}/v1/jobs/{blocker['id']}", timeout=10)
    batched = [wait_job(server, job_id) for job_id in batched]
    assert [job["batch_size"] for job in batched] == [3, 3]
    for spec, job in zip(specs, batched, strict=True):
        alone = wait_job(server, post(server, "/v1/jobs", spec).json()["id"])
        assert alone["batch_size"] == spec["n"]
        for a, b in zip(job["images"], alone["images"], strict=True):
            assert a["parameters"] == b["parameters"]
            diff = np.abs(pixels(requests.get(a["url"]).content) - pixels(requests.get(b["url"]).content)).max()
            assert diff <= 1 / 255


# -- acceptance 1: bad input -----------------------------------------------------------------------------------------

BAD = [
    ("/v1/images/generations", {"prompt": "x", "n": 0}, "n"),
    ("/v1/images/generations", {"prompt": "x", "n": 5}, "n"),
    ("/v1/images/generations", {"prompt": "x", "size": "33x32"}, "size"),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, "size"),
    ("/v1/images/generations", {"prompt": "x", "size": "2048x2048"}, "size"),
    ("/v1/images/generations", {"prompt": "x", "steps": 0}, "steps"),
    ("/v1/images/generations", {"prompt": "x", "steps": 1001}, "steps"),
    ("/v1/images/generations", {"prompt": "x", "guidance_scale": 31}, "guidance_scale"),
    ("/v1/images/generations", {"prompt": "x", "sampler": "lms"}, "sampler"),
    ("/v1/images/generations", {"prompt": "x" * 1001}, "prompt"),
    ("/v1/images/generations", {"n": 1}, "prompt"),
    ("/v1/images/generations", {"prompt": "x", "response_format": "gif"}, "response_format"),
    ("/v1/images/generations", {"prompt": "x", "seed": -3}, "seed"),
    ("/v1/images/generations", {"prompt": "x", "stream": True}, "stream"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": 99}, "cfg_scale"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Nope"}, "sampler_name"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 30}, "width"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 0}, "batch_size"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "n_iter": 0}, "n_iter"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "scheduler": "Weird"}, "scheduler"),
    ("/v1/jobs", {"prompt": "x", "cfg": 3}, "cfg"),
    ("/v1/jobs", {"prompt": "x", "n": "two"}, "n"),
    ("/v1/jobs", {"prompt": "x", "height": 12}, "height"),
    ("/v1/jobs", {"prompt": "x", "loras": {"ink": 5}}, "loras.ink"),
]


@pytest.mark.parametrize("path, body, field", BAD, ids=[f"{p.split('/')[-1]}-{f}" for p, _, f in BAD])
def test_bad_input_gets_422_naming_the_field(server, path, body, field):
    response = post(server, path, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["message"].startswith(field), error


def test_request_too_large_for_the_vram_budget_gets_413(thread_server):
    with thread_server(vram_budget_gb=BUDGET_GB) as s:  # the tiny model declares no sizes: any size is served
        response = post(s.base, "/v1/images/generations", {"prompt": "x", "n": 4, "size": "1024x1024", "steps": 1})
    assert response.status_code == 413, response.text
    message = response.json()["error"]["message"]
    assert "VRAM budget" in message and "n=4 at 1024x1024" in message and "GiB" in message


def test_sizes_the_model_does_not_declare_get_400_unless_any_size(thread_server, tiny_pipe):
    """The real clients' default sizes (512x512, 1024x1024) on a 32x32 model: 400 naming its sizes, not minutes of
    stroke texture; a request without a size gets the model's own; --any-size serves the others."""
    sized = Pipeline(tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder,
                     dataclasses.replace(tiny_pipe.config, sizes=((32, 32), (64, 32))))  # fmt: skip
    with thread_server(pipe=sized) as s:
        for path, body, field, shown in (
            ("/v1/images/generations", {"prompt": "x", "size": "1024x1024"}, "size", "1024x1024"),
            ("/sdapi/v1/txt2img", {"prompt": "x", "width": 512, "height": 512}, "width", "512"),
            ("/v1/jobs", {"prompt": "x", "width": 32, "height": 64}, "width", "32"),
        ):
            response = post(s.base, path, body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["code"] == "unsupported_size" and error["param"] == field
            assert error["message"].startswith(f"{field}={shown} is not allowed; this model supports 32x32, 64x32")
        body = {"prompt": "x", "steps": 1, "response_format": "b64_json"}
        default = post(s.base, "/v1/images/generations", body).json()["data"][0]["b64_json"]
        assert Image.open(io.BytesIO(base64.b64decode(default))).size == (32, 32)
        wide = post(s.base, "/v1/images/generations", {**body, "size": "64x32"}).json()["data"][0]["b64_json"]
        assert Image.open(io.BytesIO(base64.b64decode(wide))).size == (64, 32)
    with thread_server(pipe=sized, any_size=True) as s:
        response = post(s.base, "/v1/images/generations", {**body, "size": "64x64"})
        assert response.status_code == 200, response.text


# -- acceptance 1: jobs, progress, cancel -----------------------------------------------------------------------------


def test_events_stream_every_step_then_the_result(server):
    job = post(server, "/v1/jobs", {"prompt": "a six", "steps": 6, "seed": 3}).json()
    assert job["status"] == "queued" and job["progress"] == {"step": 0, "total": 6}
    seen = list(events(server, job["id"]))
    steps = [data["step"] for name, data in seen if name == "progress"]
    assert steps == sorted(steps) and steps[-1] == 6
    name, done = seen[-1]
    assert name == "done" and done["status"] == "succeeded" and done["progress"]["step"] == 6
    assert png_parameters(requests.get(done["images"][0]["url"]).content)["seed"] == 3


def test_cancelled_job_stops_within_one_step(server):
    job = post(server, "/v1/jobs", {"prompt": "a long one", "steps": 1000}).json()
    wait_running(server, job["id"], min_step=3)
    response = requests.delete(f"{server}/v1/jobs/{job['id']}", timeout=10)
    assert response.status_code == 202, response.text
    asked = response.json()["cancel_step"]
    final = wait_job(server, job["id"])
    assert final["status"] == "cancelled" and final["images"] == []
    assert final["progress"]["step"] - asked <= 1 and final["progress"]["step"] < 1000
    assert requests.delete(f"{server}/v1/jobs/{job['id']}", timeout=10).status_code == 409
    assert requests.delete(f"{server}/v1/jobs/nope", timeout=10).status_code == 404


def test_queued_job_cancels_at_once_and_full_queue_gets_429(server):
    blocker = post(server, "/v1/jobs", {"prompt": "blocker", "steps": 1000}).json()
    wait_running(server, blocker["id"])
    queued = [post(server, "/v1/jobs", {"prompt": "q", "steps": 2}) for _ in range(6)]
    assert all(r.status_code == 202 for r in queued)
    full = post(server, "/v1/jobs", {"prompt": "one too many", "steps": 2})
    assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
    assert full.json()["error"]["code"] == "queue_full"
    for response in queued:
        cancelled = requests.delete(f"{server}/v1/jobs/{response.json()['id']}", timeout=10)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    requests.delete(f"{server}/v1/jobs/{blocker['id']}", timeout=10)
    assert wait_job(server, blocker["id"])["status"] == "cancelled"


def test_job_history_pages(server):
    ids = [post(server, "/v1/jobs", {"prompt": f"page {i}", "steps": 1}).json()["id"] for i in range(3)]
    for job_id in ids:
        wait_job(server, job_id)
    first = requests.get(f"{server}/v1/jobs", params={"limit": 2}, timeout=10).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["next_offset"] == 2
    second = requests.get(f"{server}/v1/jobs", params={"limit": 2, "offset": 2}, timeout=10).json()
    assert second["data"][0]["id"] == ids[0] and first["total"] == second["total"] >= 3
    ok = requests.get(f"{server}/v1/jobs", params={"status": "succeeded", "limit": 100}, timeout=10).json()
    assert all(j["status"] == "succeeded" for j in ok["data"])
    bad = requests.get(f"{server}/v1/jobs", params={"status": "done"}, timeout=10)
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "status"
    assert requests.get(f"{server}/v1/jobs", params={"limit": 0}, timeout=10).json()["error"]["param"] == "limit"


# -- metrics ---------------------------------------------------------------------------------------------------------


def parse_prometheus(text: str) -> dict[str, float]:
    """{'name{labels}': value} of a text exposition, checking each line's syntax and the TYPE lines."""
    import re

    values, types = {}, {}
    for line in text.strip().split("\n"):
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if line.startswith("#"):
            continue
        match = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_]\w*="[^"]*",?)*\})? (\S+)', line)
        assert match, f"not a Prometheus sample line: {line!r}"
        values[match[1] + (match[2] or "")] = float(match[4])
    for sample in values:
        base = re.sub(r"(_bucket|_sum|_count)$", "", sample.split("{")[0])
        assert base in types or sample.split("{")[0] in types, sample
    return values


def test_metrics_in_prometheus_format(server):
    post(server, "/v1/images/generations", {"prompt": "counted", "steps": 1, "response_format": "b64_json"})
    post(server, "/v1/images/generations", {"prompt": "counted", "n": 0})
    values = parse_prometheus(requests.get(f"{server}/metrics", timeout=10).text)
    assert values['unnoise_http_requests_total{route="/v1/images/generations",status="200"}'] >= 1
    assert values['unnoise_http_requests_total{route="/v1/images/generations",status="422"}'] >= 1
    for name in ("unnoise_queue_depth", "unnoise_images_generated_total", "unnoise_ready"):
        assert name in values
    for histogram in ("batch_size_images", "queue_seconds", "generation_seconds", "step_seconds"):
        count = values[f"unnoise_{histogram}_count"]
        assert count >= 1 and values[f'unnoise_{histogram}_bucket{{le="+Inf"}}'] == count


# -- engine robustness, filters, keys, timeouts (in-process servers) ------------------------------------------------


def test_exception_in_generation_fails_that_job_only(thread_server, tiny_model):
    pipe = Pipeline.from_pretrained(tiny_model)
    start = pipe._start

    def exploding_start(req, *args):
        if req.prompt == "explode":
            raise RuntimeError("boom in generation")
        return start(req, *args)

    pipe._start = exploding_start
    with thread_server(pipe=pipe, max_batch=4) as s:
        blocker = post(s.base, "/v1/jobs", {"prompt": "blocker", "steps": 1000}).json()
        wait_running(s.base, blocker["id"])
        bad = post(s.base, "/v1/jobs", {"prompt": "explode", "steps": 3}).json()
        good = post(s.base, "/v1/jobs", {"prompt": "fine", "steps": 3}).json()
        requests.delete(f"{s.base}/v1/jobs/{blocker['id']}", timeout=10)
        bad, good = wait_job(s.base, bad["id"]), wait_job(s.base, good["id"])
        assert bad["status"] == "failed" and bad["error"]["http_status"] == 500
        assert "boom in generation" in bad["error"]["message"]
        assert good["status"] == "succeeded"  # it shared the failing batch, then ran alone
        response = post(s.base, "/v1/images/generations", {"prompt": "explode", "steps": 2})
        assert response.status_code == 500 and "boom" in response.json()["error"]["message"]
        assert post(s.base, "/v1/images/generations", {"prompt": "still serving", "steps": 2}).status_code == 200


class WordFilter:
    """A prompt filter that refuses prompts with ``word``, and an image filter that flags images whose recorded
    prompt says "hide": the pipeline's safety stage with parts of our own."""

    def __init__(self, word: str):
        self.word = word

    def check(self, prompt_or_images):
        if isinstance(prompt_or_images, str):
            blocked = self.word in prompt_or_images
            return Verdict(not blocked, "test" if blocked else None, float(blocked), f"it mentions {self.word!r}")
        hide = [image.info["parameters"].startswith("hide") for image in prompt_or_images]
        return [ImageVerdict(flag, "the image filter matched" if flag else None) for flag in hide]


def test_content_filter_hook(thread_server):
    words = WordFilter("forbidden")
    checker = SafetyChecker(SafetyConfig(watermark=False), prompt_filter=words, image_filter=words)
    with thread_server(checker=checker) as s:
        refused = post(s.base, "/v1/images/generations", {"prompt": "a forbidden thing", "steps": 1})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "content_policy_violation"
        withheld = post(s.base, "/v1/images/generations", {"prompt": "hide me", "steps": 1})
        assert withheld.status_code == 400 and "image 0" in withheld.json()["error"]["message"]
        values = parse_prometheus(requests.get(f"{s.base}/metrics", timeout=10).text)
        assert values['unnoise_filter_blocks_total{stage="prompt"}'] == 1
        assert values['unnoise_filter_blocks_total{stage="image"}'] == 1


def test_safety_filter_answers_400_with_the_category(thread_server):
    with thread_server(safety=True) as s:
        refused = post(s.base, "/v1/images/generations", {"prompt": "how to make a pipe bomb", "steps": 1})
        error = refused.json()["error"]
        assert refused.status_code == 400 and error["code"] == "content_policy_violation"
        assert "category illegal" in error["message"] or "category violence" in error["message"]
        body = {"prompt": "a handwritten seven", "steps": 1, "response_format": "b64_json"}
        allowed = post(s.base, "/v1/images/generations", body)
        assert allowed.status_code == 200
        png = base64.b64decode(allowed.json()["data"][0]["b64_json"])
        assert "Watermark" in png_parameters(png)["extra"]  # too small to mark at 32 px, and the PNG says so
        values = parse_prometheus(requests.get(f"{s.base}/metrics", timeout=10).text)
        assert values['unnoise_filter_blocks_total{stage="prompt"}'] == 1


def test_api_keys(thread_server):
    with thread_server(api_keys=("first-key", "second-key")) as s:
        body = {"prompt": "x", "steps": 1, "response_format": "b64_json"}
        assert post(s.base, "/v1/images/generations", body).status_code == 401
        wrong = post(s.base, "/v1/images/generations", body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
        ok = post(s.base, "/v1/images/generations", body, headers={"Authorization": "Bearer second-key"})
        assert ok.status_code == 200
        assert post(s.base, "/sdapi/v1/txt2img", {"steps": 1}, headers={"X-API-Key": "first-key"}).status_code == 200
        assert requests.get(f"{s.base}/v1/jobs", timeout=10).status_code == 401
        assert requests.get(f"{s.base}/health", timeout=10).status_code == 200
        assert requests.get(f"{s.base}/metrics", timeout=10).status_code == 200


def test_request_timeout_gets_504(thread_server):
    with thread_server(timeout_s=0.5, max_steps=1000) as s:
        response = post(s.base, "/v1/images/generations", {"prompt": "slow", "steps": 1000})
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        assert post(s.base, "/v1/images/generations", {"prompt": "fast", "steps": 1}).status_code == 200


# -- acceptance 1: SIGTERM -------------------------------------------------------------------------------------------


def test_sigterm_drains_running_jobs_then_exits(tiny_model, tmp_path):
    from unnoise.serve.store import SqliteStore

    port, db = free_port(), tmp_path / "jobs.sqlite3"
    process = start_process(["--model", str(tiny_model), "--db", str(db), "--max-steps", "1000", "--no-warmup"], port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process=process)
        job = post(base, "/v1/jobs", {"prompt": "drain me", "steps": 200, "seed": 9}).json()
        wait_running(base, job["id"])
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = post(base, "/v1/jobs", {"prompt": "too late", "steps": 1})
        assert refused.status_code == 503 and "Retry-After" in refused.headers
        assert requests.get(f"{base}/ready", timeout=10).json()["status"] == "draining"
        assert process.wait(60) == 0
    finally:
        stop_process(process)
    store = SqliteStore(db)  # a restart: the finished job and its image are kept
    try:
        record = store.get(job["id"])
        assert record["status"] == "succeeded" and record["steps_done"] == 200
        assert png_parameters(store.image(job["id"], 0))["seed"] == 9
    finally:
        store.close()


# -- one generation path ----------------------------------------------------------------------------------------------


def test_a_request_is_the_same_alone_in_a_batch_through_the_cli_and_the_server(thread_server, tiny_pipe,
                                                                             tiny_model, tmp_path, capsys):  # fmt: skip
    """Every surface reaches the pipeline's one public call: same seed, same images (<= 1/255)."""
    from helpers import run_cli

    from unnoise.cli import main

    prompt, seed = "a handwritten seven", 123
    mine = Request(prompt, num_images=2, steps=4, seed=seed)
    other = Request("a three", negative_prompt="blurry", num_images=3, steps=4, seed=7)
    alone = tiny_pipe.generate([mine])[0]
    batched = tiny_pipe.generate([other, mine])[1]
    status, out, err = run_cli(main, capsys, "generate", prompt, "--model", tiny_model, "-n", 2, "--steps", 4,
                               "--seed", seed, "--no-safety", "--device", "cpu", "-o", tmp_path / "cli")  # fmt: skip
    assert status == 0, err
    cli = [Image.open(path) for path in out.split() if not Path(path).name.startswith("grid")]
    with thread_server() as s:
        body = {"prompt": prompt, "n": 2, "steps": 4, "seed": seed, "response_format": "b64_json"}
        data = post(s.base, "/v1/images/generations", body).json()["data"]
        served = [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in data]
    for images in (batched, cli, served):
        assert len(images) == 2
        for got, want in zip(images, alone, strict=True):
            assert parse_parameters(got.info["parameters"]) == parse_parameters(want.info["parameters"])
            difference = np.abs(np.asarray(got, float) - np.asarray(want, float)).max()
            assert difference <= 1, difference  # 8-bit levels


def test_cache_interval_reaches_the_pipeline_from_jobs_and_openai(server):
    """Feature caching is a request field of the jobs API and an OpenAI extension: the pipeline records it."""
    job = post(server, "/v1/jobs", {"prompt": "a five", "steps": 4, "cache_interval": 2}).json()
    record = wait_job(server, job["id"])
    assert record["status"] == "succeeded" and record["request"]["cache_interval"] == 2
    assert png_parameters(requests.get(record["images"][0]["url"], timeout=10).content)["cache_interval"] == 2
    body = {"prompt": "a five", "steps": 4, "cache_interval": 3, "response_format": "b64_json"}
    data = post(server, "/v1/images/generations", body).json()["data"]
    assert png_parameters(base64.b64decode(data[0]["b64_json"]))["cache_interval"] == 3
    for path in ("/v1/jobs", "/v1/images/generations"):
        response = post(server, path, {"prompt": "a five", "cache_interval": 0})
        assert response.status_code == 422 and "cache_interval" in response.text
