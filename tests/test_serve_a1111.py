"""AUTOMATIC1111's API driven by the unchanged ``webuiapi`` client against ``unnoise serve`` (uvicorn in a thread):
txt2img with the hires fix, img2img and inpainting equal the library's images for the same settings, progress with
a preview, interrupt and skip, options and switching among the models of ``--model-dir``, the listings, LoRAs,
png-info, and bad input named by its field."""

import base64
import contextlib
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw
from test_serve import ThreadServer, WordFilter, build_tiny_pipeline, post, wait_running

from unnoise import Pipeline
from unnoise.files import file_sha256
from unnoise.models.lora import lora_hash
from unnoise.pipeline.hires import Hires
from unnoise.pipeline.images import blur_mask
from unnoise.pipeline.loading import DEFAULT_MODEL
from unnoise.safety import ImageVerdict, SafetyChecker, SafetyConfig
from unnoise.serve.config import ServeConfig
from unnoise.serve.validation import image_digest
from unnoise.serve.vram import GIB, VramPlanner

webuiapi = pytest.importorskip("webuiapi")

PROMPT, SEED, STEPS = "a handwritten seven", 11, 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """``mnist`` (the embedded default model, linked), ``small/tiny`` (a random 32x32 pipeline in our layout),
    ``sd/diffusers`` and ``sd/sd1.safetensors`` (a random tiny Stable Diffusion 1.x, as a diffusers folder and as a
    single file) and ``broken.safetensors`` (not a checkpoint: listed, but it cannot load; neither can the tiny
    single file without a config folder)."""
    from test_single_file import write_case

    folder = tmp_path_factory.mktemp("models")
    (folder / "mnist").symlink_to(DEFAULT_MODEL, target_is_directory=True)
    build_tiny_pipeline(folder / "small" / "tiny")
    write_case(folder / "sd", "sd1")
    (folder / "broken.safetensors").write_bytes(b"not a checkpoint")
    return folder


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    from test_lora_serving import random_lora

    folder = tmp_path_factory.mktemp("a1111-loras")
    random_lora(Pipeline.from_pretrained("default"), folder / "ink.safetensors", seed=0)
    return folder


@pytest.fixture(scope="module")
def pipe(model_dir, lora_dir) -> Pipeline:
    """The library's own pipeline: the oracle for the served images."""
    pipe = Pipeline.from_pretrained(model_dir / "mnist")
    pipe.lora_dir = lora_dir
    return pipe


@pytest.fixture(scope="module")
def served(model_dir, lora_dir, tmp_path_factory):
    config = ServeConfig(model=model_dir / "mnist", model_dir=model_dir, lora_dir=lora_dir, warmup=False,
                         safety=False, max_steps=1000, max_batch=4, any_size=True,
                         db=tmp_path_factory.mktemp("a1111-db") / "jobs.sqlite3")  # fmt: skip
    with ThreadServer(config) as s:
        yield s


@pytest.fixture(scope="module")
def server(served) -> str:
    return served.base


@pytest.fixture(scope="module")
def engine(served):
    return served.app.state.engine


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(baseurl=f"{server}/sdapi/v1", sampler="Euler a", steps=STEPS)


def library(pipe: Pipeline, **settings) -> Image.Image:
    return pipe(PROMPT, **{"steps": STEPS, "seed": SEED, "sampler": "euler_a", "guidance_scale": 3.0, **settings})[0]


def same_pixels(got: Image.Image, want: Image.Image, tolerance: int = 0) -> bool:
    assert got.size == want.size and got.mode == want.mode, (got.size, got.mode, want.size, want.mode)
    return np.abs(np.asarray(got, float) - np.asarray(want, float)).max() <= tolerance


def wait_progress(server: str, check, timeout: float = 60.0) -> dict:
    """Poll /progress (without asking for previews) until ``check(response)``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = requests.get(f"{server}/sdapi/v1/progress", params={"skip_current_image": True}, timeout=10).json()
        if check(response):
            return response
        time.sleep(0.02)
    raise TimeoutError(response)


@contextlib.contextmanager
def held_at_first_step(engine, run: int):
    """The engine's ``run``-th sampler pass from now waits after its first step until ``release`` is set
    (``reached`` is set then): progress, interrupt and skip land at a known step, whatever the machine's speed."""
    pipe = engine.pipe
    generate, runs = pipe.generate, []
    reached, release = threading.Event(), threading.Event()

    def held_generate(requests, callback=None):
        runs.append(1)
        if len(runs) != run:
            return generate(requests, callback)

        def held(i, total, sigma, preview):
            stop = callback(i, total, sigma, preview)
            if i == 0:
                reached.set()
                release.wait(60)
            return stop

        return generate(requests, held)

    pipe.generate = held_generate
    try:
        yield reached, release
    finally:
        release.set()
        del pipe.generate


class Background(threading.Thread):
    """A client call in a thread; ``result()`` joins it and returns (or raises) what the call did."""

    def __init__(self, fn, **kwargs):
        super().__init__(daemon=True)
        self.fn, self.kwargs, self.value, self.error = fn, kwargs, None, None
        self.start()

    def run(self):
        try:
            self.value = self.fn(**self.kwargs)
        except Exception as error:  # noqa: BLE001 - handed to result()
            self.error = error

    def result(self, timeout: float = 60.0):
        self.join(timeout)
        assert not self.is_alive(), "the call did not return"
        if self.error is not None:
            raise self.error
        return self.value


# -- generation ------------------------------------------------------------------------------------------------------


def test_txt2img_is_the_library_image_and_its_info_says_so(api, pipe):
    result = api.txt2img(prompt=PROMPT, seed=SEED, steps=STEPS, cfg_scale=3.0, width=32, height=32, batch_size=2)
    want = pipe(PROMPT, num_images=2, steps=STEPS, seed=SEED, sampler="euler_a", guidance_scale=3.0)
    assert all(same_pixels(g, w) for g, w in zip(result.images, want, strict=True))
    info = result.info
    assert (info["all_seeds"], info["sampler_name"], info["cfg_scale"], info["width"]) == ([SEED, SEED + 1], "Euler a",
                                                                                          3.0, 32)  # fmt: skip
    assert info["infotexts"] == [image.info["parameters"] for image in want]
    assert result.parameters["prompt"] == PROMPT and result.parameters["enable_hr"] is False


@pytest.mark.parametrize("upscaler, ours", [("Latent", "latent"), ("Lanczos", "lanczos")])
def test_txt2img_hires_fix_is_the_library_hires_fix(api, pipe, upscaler, ours):
    result = api.txt2img(prompt=PROMPT, seed=SEED, steps=STEPS, cfg_scale=3.0, width=32, height=32, enable_hr=True,
                         hr_scale=2, hr_upscaler=upscaler, hr_second_pass_steps=3, denoising_strength=0.6)  # fmt: skip
    want = library(pipe, hires=Hires(scale=2, upscaler=ours, steps=3, strength=0.6))
    assert result.image.size == (64, 64) and same_pixels(result.image, want)
    assert result.info["denoising_strength"] == 0.6 and result.info["infotexts"] == [want.info["parameters"]]


def test_hires_upscaler_names():
    """Each of AUTOMATIC1111's names the listings give is the library's upscaler of that name; "None" resizes with
    Lanczos, as AUTOMATIC1111's resize_image does."""
    from unnoise.pipeline.hires import UPSCALERS
    from unnoise.serve.a1111 import A1111Txt2ImgRequest, hires_values, latent_upscale_modes, upscalers

    names = [entry["name"] for entry in [*upscalers(), *latent_upscale_modes()]]
    assert len(names) == len(UPSCALERS) + 1
    for name in names:
        hires = hires_values(A1111Txt2ImgRequest(enable_hr=True, hr_upscaler=name))["hires"]
        assert UPSCALERS[hires.upscaler].a1111_name == ("Lanczos" if name == "None" else name)
    assert hires_values(A1111Txt2ImgRequest(enable_hr=False, hr_upscaler="Latent")) == {}


def test_img2img_is_the_library_img2img(api, pipe, server):
    init = library(pipe, seed=1)
    result = api.img2img(images=[init], prompt=PROMPT, seed=SEED, steps=STEPS, cfg_scale=3.0, width=32, height=32,
                         denoising_strength=0.5)  # fmt: skip
    assert same_pixels(result.image, library(pipe, image=init, strength=0.5))
    assert result.parameters["init_images"] is None and result.info["denoising_strength"] == 0.5
    wide = api.img2img(images=[init], prompt=PROMPT, seed=SEED, steps=STEPS, cfg_scale=3.0, width=64, height=32,
                       denoising_strength=0.5, resize_mode=1)  # fmt: skip
    assert same_pixels(wide.image, library(pipe, image=init, strength=0.5, width=64, height=32, resize_mode="crop"))
    # the store keeps which image a job was given, as the sha256 of its pixels, not the pixels
    body = {"init_images": [webuiapi.raw_b64_img(init)], "prompt": PROMPT, "steps": STEPS, "denoising_strength": 0.5}
    response = post(server, "/sdapi/v1/img2img", body)
    job = requests.get(f"{server}/v1/jobs/{response.headers['X-Job-Id']}", timeout=10).json()
    assert job["request"]["image"] == image_digest(init) and job["request"]["strength"] == 0.5


def square_mask(size=(32, 32), box=(8, 8, 20, 20)) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


@pytest.mark.parametrize("full_res", [False, True])
def test_inpainting_is_the_library_inpainting(api, pipe, full_res):
    init, mask = library(pipe, seed=2), square_mask()
    result = api.img2img(images=[init], mask_image=mask, prompt=PROMPT, seed=SEED, steps=STEPS, cfg_scale=3.0,
                         width=32, height=32, denoising_strength=0.9, mask_blur=2, inpainting_fill=1,
                         inpaint_full_res=full_res, inpaint_full_res_padding=4)  # fmt: skip
    padding = dict(inpaint_full_res_padding=4) if full_res else {}  # the library refuses a padding it cannot apply
    want = library(pipe, image=init, mask=mask, strength=0.9, mask_blur=2, inpainting_fill="original",
                   inpaint_full_res=full_res, **padding)  # fmt: skip
    assert same_pixels(result.image, want)
    far = np.asarray(blur_mask(mask, 2)) == 0
    assert far.sum() > 500 and np.array_equal(np.asarray(result.image)[far], np.asarray(init)[far])  # pasted back
    inverted = api.img2img(images=[init], mask_image=mask, prompt=PROMPT, seed=SEED, steps=STEPS, cfg_scale=3.0,
                           width=32, height=32, denoising_strength=0.9, mask_blur=2, inpainting_fill=0,
                           inpaint_full_res=full_res, inpainting_mask_invert=1)  # fmt: skip
    padding = dict(inpaint_full_res_padding=0) if full_res else {}
    want = library(pipe, image=init, mask=mask, strength=0.9, mask_blur=2, inpainting_fill="fill",
                   inpaint_full_res=full_res, mask_invert=True, **padding)  # fmt: skip
    assert same_pixels(inverted.image, want)


def test_compatible_img2img_requests_share_a_batch(server, pipe):
    blocker = post(server, "/v1/jobs", {"prompt": "blocker", "steps": 1000}).json()["id"]
    wait_running(server, blocker)
    inits = [library(pipe, seed=3), library(pipe, seed=4)]
    bodies = [
        {
            "init_images": [webuiapi.b64_img(image)],
            "prompt": PROMPT,
            "seed": SEED + k,
            "steps": STEPS,
            "cfg_scale": 3.0,
            "sampler_name": "Euler a",
            "denoising_strength": 0.5,
        }
        for k, image in enumerate(inits)
    ]
    calls = [Background(post, base=server, path="/sdapi/v1/img2img", body=body) for body in bodies]
    deadline = time.monotonic() + 30
    while requests.get(f"{server}/v1/jobs", params={"status": "queued"}, timeout=10).json()["total"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    requests.delete(f"{server}/v1/jobs/{blocker}", timeout=10)
    for k, (call, init) in enumerate(zip(calls, inits, strict=True)):
        response = call.result()
        assert response.status_code == 200 and response.headers["X-Batch-Size"] == "2", response.text
        got = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
        assert same_pixels(got, library(pipe, image=init, strength=0.5, seed=SEED + k), tolerance=1)


# -- progress, interrupt, skip, wait for ready -----------------------------------------------------------------------


def test_progress_reports_the_running_job_with_a_preview(api, server):
    call = Background(api.txt2img, prompt=PROMPT, seed=SEED, steps=1000, width=32, height=32)
    first = wait_progress(server, lambda r: r["state"]["sampling_step"] >= 1)
    assert 0 < first["progress"] < 1 and first["eta_relative"] >= 0
    assert first["state"]["job"] == "txt2img" and first["state"]["job_count"] == 1
    assert first["state"]["sampling_steps"] == 1000 and not first["state"]["interrupted"]
    deadline = time.monotonic() + 30
    while (shown := api.get_progress())["current_image"] is None:  # decoded at the step after it was asked for
        assert time.monotonic() < deadline
    preview = Image.open(io.BytesIO(base64.b64decode(shown["current_image"])))
    assert preview.size == (32, 32) and preview.format == "PNG"
    skipped = requests.get(f"{server}/sdapi/v1/progress", params={"skip_current_image": True}, timeout=10).json()
    assert skipped["current_image"] is None and skipped["state"]["sampling_step"] >= 1
    assert api.interrupt() == {}
    result = call.result()
    assert result.images == [] and result.info["all_seeds"] == []
    idle = api.get_progress()
    assert (idle["progress"], idle["state"]["job_count"], idle["current_image"]) == (0, 0, None)


def test_interrupt_returns_the_batches_made_before_and_drops_the_rest(api, server, engine, pipe):
    """Batches of --max-batch images run one after the other: the first finishes, the second is interrupted, the
    third never runs."""
    with held_at_first_step(engine, run=2) as (reached, release):
        call = Background(api.txt2img, prompt=PROMPT, seed=SEED, steps=STEPS, cfg_scale=3.0, width=32, height=32,
                          batch_size=4, n_iter=3)  # fmt: skip
        assert reached.wait(60)
        state = api.get_progress()["state"]
        assert (state["job_count"], state["sampling_step"], state["interrupted"]) == (2, 1, False)
        assert api.interrupt() == {}
        assert api.get_progress()["state"]["interrupted"]
        release.set()
        result = call.result()
    assert result.info["all_seeds"] == [SEED + i for i in range(4)] and len(result.images) == 4
    want = pipe(PROMPT, num_images=4, steps=STEPS, seed=SEED, sampler="euler_a", guidance_scale=3.0)
    assert all(same_pixels(g, w) for g, w in zip(result.images, want, strict=True))
    jobs = requests.get(f"{server}/v1/jobs", params={"limit": 3}, timeout=10).json()["data"][::-1]
    assert [(j["status"], j["progress"]["step"], j["started_at"] is not None) for j in jobs] == [
        ("succeeded", STEPS, True), ("cancelled", 1, True), ("cancelled", 0, False)]  # fmt: skip
    assert {j["error"]["code"] for j in jobs[1:]} == {"interrupted"}


def test_skip_stops_the_running_batch_and_the_next_one_runs(api, server, engine, pipe):
    with held_at_first_step(engine, run=1) as (reached, release):
        call = Background(api.txt2img, prompt=PROMPT, seed=SEED, steps=STEPS, cfg_scale=3.0, width=32, height=32,
                          batch_size=4, n_iter=2)  # fmt: skip
        assert reached.wait(60)
        assert api.skip() is None and api.get_progress()["state"]["skipped"]
        release.set()
        result = call.result()
    assert result.info["all_seeds"] == [SEED + 4 + i for i in range(4)]
    want = pipe(PROMPT, num_images=4, steps=STEPS, seed=SEED + 4, sampler="euler_a", guidance_scale=3.0)
    assert all(same_pixels(g, w) for g, w in zip(result.images, want, strict=True))
    jobs = requests.get(f"{server}/v1/jobs", params={"limit": 2}, timeout=10).json()["data"][::-1]
    assert [(j["status"], (j["error"] or {}).get("code")) for j in jobs] == [("cancelled", "skipped"),
                                                                            ("succeeded", None)]  # fmt: skip


def test_wait_for_ready_waits_for_the_queue(api, server, engine):
    with held_at_first_step(engine, run=1) as (reached, release):
        call = Background(api.txt2img, prompt=PROMPT, steps=STEPS, width=32, height=32, batch_size=4, n_iter=2)
        assert reached.wait(60)
        waiting = Background(api.util_wait_for_ready, check_interval=0.02)
        busy = wait_progress(server, lambda r: r["state"]["job_count"] == 2)
        assert busy["progress"] > 0 and waiting.is_alive()
        release.set()
        waiting.result()
        jobs = requests.get(f"{server}/v1/jobs", params={"limit": 2}, timeout=10).json()["data"]
        assert [j["status"] for j in jobs] == ["succeeded", "succeeded"]  # both had run when it returned
    assert len(call.result().images) == 8
    api.util_wait_for_ready(check_interval=0.02)  # idle: at once


# -- models and options ----------------------------------------------------------------------------------------------


def test_models_options_and_switching(api, server, model_dir, pipe):
    models = {m["model_name"]: m for m in api.get_sd_models()}
    assert sorted(models) == ["broken", "mnist", "sd_diffusers", "sd_sd1", "small_tiny"]
    mnist = models["mnist"]
    digest = file_sha256(DEFAULT_MODEL / "unet" / "model.safetensors")
    assert (mnist["sha256"], mnist["hash"], mnist["title"]) == (digest, pipe.model_hash, f"mnist [{digest[:10]}]")
    assert mnist["filename"] == str(model_dir / "mnist") and mnist["config"] is None
    assert models["broken"]["sha256"] == file_sha256(model_dir / "broken.safetensors")
    options = api.get_options()
    assert options["sd_model_checkpoint"] == api.util_get_current_model() == mnist["title"]
    assert options["sd_checkpoint_hash"] == digest
    assert api.set_options(options) is None  # what was read back, unchanged

    api.util_set_model("tiny")  # the closest title, as the client picks it
    assert api.util_get_current_model() == models["small_tiny"]["title"]
    assert requests.get(f"{server}/ready", timeout=10).json()["model"] == "tiny"
    tiny = Pipeline.from_pretrained(model_dir / "small" / "tiny")
    result = api.txt2img(prompt=PROMPT, seed=SEED, steps=STEPS, cfg_scale=3.0, width=32, height=32)
    assert same_pixels(result.image, library(tiny)) and result.info["sd_model_name"] == "tiny"

    failed = requests.post(f"{server}/sdapi/v1/options", json={"sd_model_checkpoint": "broken.safetensors"}, timeout=60)
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "model_load_failed", failed.text
    assert api.util_get_current_model() == models["small_tiny"]["title"]  # still served

    # a switch waits for the jobs queued before it (they run on the old model); new ones get 503 meanwhile
    blocker = post(server, "/v1/jobs", {"prompt": "blocker", "steps": 1000}).json()["id"]
    wait_running(server, blocker)
    queued = post(server, "/v1/jobs", {"prompt": PROMPT, "seed": SEED, "steps": STEPS, "sampler": "euler_a",
                                       "guidance_scale": 3.0}).json()["id"]  # fmt: skip
    switch = Background(api.set_options, options={"sd_model_checkpoint": mnist["title"]})
    deadline = time.monotonic() + 30
    while (refused := post(server, "/v1/jobs", {"prompt": "x", "steps": 1})).status_code != 503:
        assert time.monotonic() < deadline, refused.text
    assert refused.json()["error"]["code"] == "switching_model" and refused.headers["Retry-After"] == "5"
    requests.delete(f"{server}/v1/jobs/{blocker}", timeout=10)
    assert switch.result() is None and api.util_get_current_model() == mnist["title"]
    done = requests.get(f"{server}/v1/jobs/{queued}", timeout=10).json()
    png = requests.get(done["images"][0]["url"], timeout=10).content
    assert same_pixels(Image.open(io.BytesIO(png)), library(tiny))


def test_switching_to_a_diffusers_folder(api, model_dir):
    """A diffusers folder of --model-dir loads through Pipeline.from_pretrained and serves the library's image (a
    single file does too; the tiny one here has shapes that no shipped family config describes)."""
    name = "sd/diffusers"
    entry = next(m for m in api.get_sd_models() if m["title"].startswith(name + " ["))
    assert entry["sha256"] == file_sha256(model_dir / name / "unet" / "diffusion_pytorch_model.safetensors")
    assert api.set_options({"sd_model_checkpoint": entry["title"]}) is None  # webuiapi returns an error's body
    try:
        assert api.util_get_current_model() == entry["title"]
        result = api.txt2img(prompt="a cat", seed=SEED, steps=2, cfg_scale=3.0, width=32, height=32)
        want = Pipeline.from_pretrained(model_dir / name)("a cat", seed=SEED, steps=2, sampler="euler_a",
                                                          guidance_scale=3.0, width=32, height=32)[0]  # fmt: skip
        assert same_pixels(result.image, want)
    finally:
        api.set_options({"sd_model_checkpoint": "mnist"})


def test_listings(api, server, model_dir):
    assert {"Euler a", "DPM++ 2M", "Euler"} <= set(api.util_get_sampler_names())
    schedulers = {s["name"]: s for s in api.get_schedulers()}
    assert schedulers["automatic"]["label"] == "Automatic" and schedulers["karras"]["label"] == "Karras"
    assert {"None", "Lanczos", "Nearest"} == {u["name"] for u in api.get_upscalers()}
    assert "Latent (bicubic antialiased)" in {m["name"] for m in api.get_latent_upscale_modes()}
    assert api.get_sd_vae() == [] and api.get_embeddings() == {"loaded": {}, "skipped": {}}
    memory = api.get_memory()
    assert 0 < memory["ram"]["used"] < memory["ram"]["total"] and "cuda" in memory
    flags = api.get_cmd_flags()
    assert (flags["model_dir"], flags["ckpt_dir"], flags["api_keys"], flags["api"]) == (str(model_dir),) * 2 + (0, True)
    assert api.refresh_checkpoints() is None
    # every listed sampler and scheduler is read back as the one listed
    from unnoise.serve.a1111 import A1111Txt2ImgRequest, a1111_values

    for sampler in api.get_samplers():
        assert a1111_values(A1111Txt2ImgRequest(sampler_name=sampler["name"]))["sampler"] == sampler["aliases"][0]
    for scheduler in api.get_schedulers():
        for name in (scheduler["name"], scheduler["label"]):
            spacing = a1111_values(A1111Txt2ImgRequest(scheduler=name))["spacing"]
            assert spacing == (None if name.lower() == "automatic" else scheduler["name"])
    assert post(server, "/sdapi/v1/txt2img", {"sampler_name": "DPM++ 2M Karras", "steps": 2}).status_code == 200


def test_loras_and_a_tagged_prompt(api, pipe, lora_dir):
    refreshed = api.session.post(f"{api.baseurl}/refresh-loras")  # webuiapi has no method for it
    assert refreshed.status_code == 200 and refreshed.json() is None
    [entry] = api.get_loras()
    assert (entry["name"], entry["alias"], entry["path"]) == ("ink", "ink", str(lora_dir / "ink.safetensors"))
    assert entry["hash"] == lora_hash(lora_dir / "ink.safetensors") and isinstance(entry["metadata"], dict)
    result = api.txt2img(prompt=f"{PROMPT} <lora:ink:0.5>", seed=SEED, steps=STEPS, cfg_scale=3.0, width=32,
                         height=32)  # fmt: skip
    assert same_pixels(result.image, library(pipe, loras={"ink": 0.5}))
    assert result.info["prompt"] == f"{PROMPT} <lora:ink:0.5>"


def test_png_info(api, pipe):
    image = library(pipe)
    result = api.png_info(image)
    assert result.info == image.info["parameters"]
    fields = result.json["parameters"]
    assert (fields["Prompt"], fields["Steps"], fields["Sampler"], fields["Seed"]) == (PROMPT, "4", "Euler a", "11")
    assert (fields["Size-1"], fields["Size-2"], fields["CFG scale"]) == ("32", "32", "3.0")
    plain = api.png_info(Image.new("L", (8, 8)))
    assert (plain.info, plain.json["parameters"]) == ("", {})


def test_infotext_fields_as_automatic1111_parses_them():
    from unnoise.serve.a1111 import infotext_fields

    text = (
        'a cat\nin a hat\nNegative prompt: dog\nSteps: 4, Sampler: Euler a, Lora hashes: "ink: abc, x: y", Size: 32x64'
    )
    assert infotext_fields(text) == {"Prompt": "a cat\nin a hat", "Negative prompt": "dog", "Steps": "4",
                                     "Sampler": "Euler a", "Lora hashes": "ink: abc, x: y", "Size-1": "32",
                                     "Size-2": "64"}  # fmt: skip
    assert infotext_fields("just a prompt: with a colon") == {"Prompt": "just a prompt: with a colon",
                                                               "Negative prompt": ""}  # fmt: skip


# -- bad input, keys, filters ----------------------------------------------------------------------------------------


def b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


GRAY = b64(Image.new("L", (32, 32), 128))
IMG2IMG = {"prompt": "x", "steps": 2, "init_images": [GRAY]}
BAD = [
    ("img2img", {**IMG2IMG, "init_images": ["not base64!"]}, "init_images.0"),
    ("img2img", {**IMG2IMG, "init_images": [base64.b64encode(b"not an image").decode()]}, "init_images.0"),
    ("img2img", {**IMG2IMG, "init_images": ["http://example.com/a.png"]}, "init_images.0"),
    ("img2img", {**IMG2IMG, "init_images": []}, "init_images"),
    ("img2img", {**IMG2IMG, "mask": "%%%"}, "mask"),
    ("img2img", {**IMG2IMG, "mask": b64(Image.new("L", (16, 16)))}, "mask"),
    ("img2img", {**IMG2IMG, "resize_mode": 4}, "resize_mode"),
    ("img2img", {**IMG2IMG, "resize_mode": "crop"}, "resize_mode"),
    ("img2img", {**IMG2IMG, "inpainting_fill": 7, "mask": GRAY}, "inpainting_fill"),
    ("img2img", {**IMG2IMG, "denoising_strength": 0}, "denoising_strength"),
    ("img2img", {**IMG2IMG, "mask": GRAY, "mask_blur_x": 2, "mask_blur_y": 3}, "mask_blur_y"),
    ("img2img", {**IMG2IMG, "sampler_name": "Nope"}, "sampler_name"),
    ("img2img", {**IMG2IMG, "restore_faces": True}, "restore_faces"),
    ("txt2img", {"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
    ("txt2img", {"enable_hr": True, "hr_scale": 16, "width": 256, "height": 256}, "hr_scale"),
    ("txt2img", {"enable_hr": True, "hr_resize_x": 4096, "width": 256, "height": 256}, "hr_resize_x"),
    ("txt2img", {"enable_hr": True, "hr_prompt": "something else"}, "hr_prompt"),
    ("txt2img", {"scheduler": "Weird"}, "scheduler"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "nope"}}, "override_settings.sd_model_checkpoint"),
    ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 2}}, "override_settings.CLIP_stop_at_last_layers"),
    ("options", {"sd_model_checkpoint": "nope"}, "sd_model_checkpoint"),
    ("options", {"CLIP_stop_at_last_layers": 2}, "CLIP_stop_at_last_layers"),
    ("options", {"samples_format": "jpg"}, "samples_format"),
    ("png-info", {"image": "***"}, "image"),
]


@pytest.mark.parametrize("path, body, field", BAD, ids=[f"{p}-{i}-{f}" for i, (p, _, f) in enumerate(BAD)])
def test_bad_input_gets_422_naming_the_field(server, path, body, field):
    response = post(server, f"/sdapi/v1/{path}", body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["message"].startswith(field), error


class PreviewFilter(WordFilter):
    """``WordFilter``, and previews (images without parameters) are flagged too."""

    def check(self, prompt_or_images):
        if isinstance(prompt_or_images, str):
            return super().check(prompt_or_images)
        verdicts = super().check([i for i in prompt_or_images if "parameters" in i.info])[::-1]
        return [verdicts.pop() if "parameters" in i.info else ImageVerdict(True, "a preview") for i in prompt_or_images]


def test_keys_filters_and_the_vram_budget_apply_as_to_every_request(tmp_path, model_dir):
    words = PreviewFilter("forbidden")
    checker = SafetyChecker(SafetyConfig(watermark=False), prompt_filter=words, image_filter=words)
    tiny = Pipeline.from_pretrained(model_dir / "small" / "tiny")
    planner = VramPlanner(tiny, 1, 1)
    small, large = planner.estimate(1, 32, 32).peak, planner.estimate(1, 128, 128).peak
    budget = (small + large) / 2  # 32x32 fits, the hires fix's 128x128 does not
    config = ServeConfig(model=model_dir / "small" / "tiny", warmup=False, api_keys=("sesame",), max_steps=1000,
                         vram_budget_gb=budget / GIB, db=tmp_path / "jobs.sqlite3")  # fmt: skip
    key = {"X-API-Key": "sesame"}
    with ThreadServer(config, safety=checker) as s:
        anonymous = webuiapi.WebUIApi(baseurl=f"{s.base}/sdapi/v1", steps=2)
        with pytest.raises(RuntimeError) as refused:
            anonymous.img2img(images=[Image.new("L", (32, 32))], prompt="x", width=32, height=32)
        assert refused.value.args[0] == 401
        client = webuiapi.WebUIApi(baseurl=f"{s.base}/sdapi/v1", steps=2, username="anyone", password="sesame")
        ok = client.img2img(images=[Image.new("L", (32, 32))], prompt="a digit", width=32, height=32)
        assert ok.image.size == (32, 32)
        with pytest.raises(RuntimeError) as blocked:
            client.img2img(images=[Image.new("L", (32, 32))], prompt="a forbidden digit", width=32, height=32)
        assert blocked.value.args[0] == 400 and "content_policy_violation" in blocked.value.args[1]
        withheld = requests.post(f"{s.base}/sdapi/v1/img2img", json={**IMG2IMG, "prompt": "hide me"}, headers=key,
                                 timeout=60)  # fmt: skip
        assert withheld.status_code == 400 and "image 0" in withheld.json()["error"]["message"]
        too_big = requests.post(f"{s.base}/sdapi/v1/txt2img", json={"enable_hr": True, "hr_scale": 4}, headers=key,
                                timeout=60)  # fmt: skip
        assert too_big.status_code == 413 and too_big.json()["error"]["param"] == "batch_size", too_big.text
        assert "at 128x128" in too_big.json()["error"]["message"]
        # previews go through the image filter: this one flags every preview, so none is shown
        job = requests.post(f"{s.base}/v1/jobs", json={"prompt": "a digit", "steps": 1000}, headers=key, timeout=10)
        first = client.get_progress()["state"]["sampling_step"]
        deadline = time.monotonic() + 30
        while (seen := client.get_progress())["state"]["sampling_step"] < first + 3:
            assert seen["current_image"] is None and time.monotonic() < deadline
        assert seen["current_image"] is None
        requests.delete(f"{s.base}/v1/jobs/{job.json()['id']}", headers=key, timeout=10)


def test_the_model_dir_flag(tmp_path, model_dir, capsys):
    import argparse

    from unnoise.serve.cli import add_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model-dir", str(model_dir)])
    assert config_from_args(args).model_dir == model_dir
    missing = parser.parse_args(["serve", "--model-dir", str(tmp_path / "nope")])
    with pytest.raises(SystemExit) as exited:
        missing.run(missing)
    assert exited.value.code == 2 and "argument --model-dir" in capsys.readouterr().err


def test_info_is_a_json_string(server):
    response = post(server, "/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 1})
    assert isinstance(response.json()["info"], str) and json.loads(response.json()["info"])["steps"] == 1
