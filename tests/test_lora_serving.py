"""LoRA adapters end to end on the server: a request's ``loras`` (jobs, OpenAI) or ``<lora:>`` prompt tags
(AUTOMATIC1111) name files of ``--lora-dir``, which the worker loads on first use; the image is the library call's,
requests with other adapters never share its sampler pass, its PNG records the adapters as AUTOMATIC1111 does and
``unnoise generate --from-png`` reproduces it; unknown names are a 400 naming the ones there are."""

import base64
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from helpers import run_cli
from PIL import Image
from test_serve import ThreadServer, png_parameters, post, wait_job, wait_running

from unnoise.cli import main
from unnoise.models.lora import LoRAAdapter, lora_hash, save_lora
from unnoise.pipeline import Pipeline
from unnoise.serve.config import ServeConfig

PROMPT, SEED, STEPS = "a handwritten seven", 3, 4


def random_lora(pipe: Pipeline, path: Path, seed: int) -> Path:
    """An adapter on the attention layers of the U-Net and the text encoder, ``up`` drawn at random (a new adapter
    starts as the identity), saved in the kohya format."""
    g = torch.Generator().manual_seed(seed)
    networks = {"unet": pipe.unet, "text_encoder": pipe.text_encoder.lora_root()}
    adapter = LoRAAdapter.create(networks, rank=4, alpha=4, generator=g)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.up.normal_(0, 0.5, generator=g)
    return save_lora(adapter, path)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    """``ink`` (used by the tests) and ``spare`` (never requested but by the listing test)."""
    folder = tmp_path_factory.mktemp("loras")
    pipe = Pipeline.from_pretrained("default")
    random_lora(pipe, folder / "ink.safetensors", seed=0)
    random_lora(pipe, folder / "spare.safetensors", seed=1)
    return folder


@pytest.fixture(scope="module")
def expected(lora_dir) -> dict[str, np.ndarray]:
    """The library's images, from a pipeline of its own: without LoRA (seeds 3 and 4), with ink at 1 and at 0.5."""
    pipe = Pipeline.from_pretrained("default")
    pipe.lora_dir = lora_dir
    calls = {"base": {}, "ink": {"loras": {"ink": 1.0}}, "ink@0.5": {"loras": {"ink": 0.5}}, "seed4": {"seed": 4}}
    settings = {"steps": STEPS, "seed": SEED}
    return {key: np.asarray(pipe(PROMPT, **{**settings, **kwargs})[0]) for key, kwargs in calls.items()}


@pytest.fixture(scope="module")
def server(lora_dir, expected, tmp_path_factory):
    """``unnoise serve --lora-dir`` on a fresh default pipeline (no adapter loaded), in a thread."""
    config = ServeConfig(model=Path("unused"), db=tmp_path_factory.mktemp("db") / "jobs.sqlite3", warmup=False,
                         safety=False, max_steps=1000, lora_dir=lora_dir)  # fmt: skip
    with ThreadServer(config, pipe=Pipeline.from_pretrained("default")) as s:
        yield s.base


def job(base: str, **body) -> dict:
    response = post(base, "/v1/jobs", {"prompt": PROMPT, "steps": STEPS, "seed": SEED, **body})
    assert response.status_code == 202, response.text
    return response.json()


def image(finished: dict) -> bytes:
    assert finished["status"] == "succeeded", finished
    return requests.get(finished["images"][0]["url"], timeout=30).content


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_a_job_with_loras_is_the_library_image_and_its_png_records_them(server, lora_dir, expected):
    with_lora = wait_job(server, job(server, loras={"ink": 1.0})["id"])
    without = wait_job(server, job(server)["id"])
    assert with_lora["request"]["loras"] == {"ink": 1.0} and without["request"]["loras"] == {}
    png = image(with_lora)
    assert np.array_equal(pixels(png), expected["ink"])
    assert np.array_equal(pixels(image(without)), expected["base"])
    assert not np.array_equal(expected["ink"], expected["base"])
    text = Image.open(io.BytesIO(png)).info["parameters"]
    assert text.startswith(f"{PROMPT} <lora:ink:1>\n")
    assert f'Lora hashes: "ink: {lora_hash(lora_dir / "ink.safetensors")}"' in text
    params = png_parameters(png)
    assert (params["prompt"], params["loras"]) == (PROMPT, {"ink": 1.0})


def test_jobs_with_other_loras_never_share_a_sampler_pass(server, expected):
    """Four jobs queued together: the two without a LoRA share a pass, ink at 1 and ink at 0.5 run alone."""
    blocker = job(server, steps=1000)["id"]  # holds the worker while the others queue
    wait_running(server, blocker)
    ids = {
        "base": job(server)["id"],
        "ink": job(server, loras={"ink": 1.0})["id"],
        "seed4": job(server, seed=4)["id"],
        "ink@0.5": job(server, loras={"ink": 0.5})["id"],
    }
    assert requests.delete(f"{server}/v1/jobs/{blocker}", timeout=10).status_code == 202
    done = {key: wait_job(server, job_id) for key, job_id in ids.items()}
    assert {key: finished["batch_size"] for key, finished in done.items()} == {
        "base": 2, "seed4": 2, "ink": 1, "ink@0.5": 1
    }  # fmt: skip
    for key, finished in done.items():
        got = pixels(image(finished)).astype(float)
        tolerance = 1 if finished["batch_size"] > 1 else 0  # batched: float rounding, at most one 8-bit level
        assert np.abs(got - expected[key]).max() <= tolerance, key
    assert not np.array_equal(expected["ink"], expected["ink@0.5"])


def test_every_api_takes_loras(server, expected):
    body = {"prompt": PROMPT, "steps": STEPS, "seed": SEED, "loras": {"ink": 1.0}, "response_format": "b64_json"}
    response = post(server, "/v1/images/generations", body)
    assert response.status_code == 200, response.text
    assert np.array_equal(pixels(base64.b64decode(response.json()["data"][0]["b64_json"])), expected["ink"])
    body = {"prompt": f"{PROMPT} <lora:ink:1>", "steps": STEPS, "seed": SEED}  # AUTOMATIC1111: tags in the prompt
    response = post(server, "/sdapi/v1/txt2img", body)
    assert response.status_code == 200, response.text
    assert np.array_equal(pixels(base64.b64decode(response.json()["images"][0])), expected["ink"])
    assert json.loads(response.json()["info"])["infotexts"][0].startswith(f"{PROMPT} <lora:ink:1>\n")


UNKNOWN = [
    ("/v1/jobs", {"loras": {"nope": 1}}, "loras", "loras={'nope': 1.0} is not allowed; 'nope' is not a known LoRA"),
    ("/v1/images/generations", {"loras": {"ink": 1, "nope": 0.5}}, "loras", "loras={'ink': 1.0, 'nope': 0.5}"),
    ("/sdapi/v1/txt2img", {"prompt": "x <lora:nope:1>"}, "prompt", "prompt='x <lora:nope:1>' is not allowed; its tag"),
]


@pytest.mark.parametrize("path, body, field, start", UNKNOWN, ids=[p.split("/")[-1] for p, *_ in UNKNOWN])
def test_an_unknown_lora_is_a_400_naming_the_field_and_the_available_ones(server, path, body, field, start):
    response = post(server, path, {"prompt": "x", "steps": 1, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (field, "unknown_lora")
    assert error["message"].startswith(start) and error["message"].endswith("available: ink, spare"), error


BOUNDS = [
    ("/v1/jobs", {"loras": {"ink": 4.5}}, "loras.ink", "loras.ink=4.5 is not allowed; Input should be less than"),
    ("/v1/jobs", {"loras": {"ink": math.nan}}, "loras.ink", "loras.ink=nan is not allowed; Input should be a finite"),
    ("/v1/jobs", {"loras": {"ink": "strong"}}, "loras.ink", "loras.ink='strong' is not allowed; Input should be a"),
    ("/v1/jobs", {"loras": ["ink"]}, "loras", "loras=['ink'] is not allowed; Input should be a valid dictionary"),
    ("/sdapi/v1/txt2img", {"prompt": "x <lora:ink:-5>"}, "prompt", "prompt='<lora:ink:-5.0>' is not allowed; Input"),
    ("/sdapi/v1/txt2img", {"prompt": "x <lora:ink:big>"}, "prompt", "prompt='x <lora:ink:big>' is not allowed; <lora"),
]


@pytest.mark.parametrize("path, body, field, start", BOUNDS, ids=[f"{p.split('/')[-1]}-{i}" for i, (p, *_) in
                                                                  enumerate(BOUNDS)])  # fmt: skip
def test_a_bad_scale_is_a_422_naming_the_field(server, path, body, field, start):
    data = json.dumps({"prompt": "x", "steps": 1, **body})  # NaN as Python writes it (requests' json= refuses it)
    response = requests.post(f"{server}{path}", data=data, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["message"].startswith(start), error


def test_loras_are_listed_with_their_hash_and_whether_they_are_loaded(server, lora_dir):
    def listed() -> dict[str, dict]:
        body = requests.get(f"{server}/v1/loras", timeout=30).json()
        return {entry["name"]: entry for entry in body["data"]}

    before = listed()
    assert sorted(before) == ["ink", "spare"]
    assert before["spare"] == {"name": "spare", "object": "lora", "hash": lora_hash(lora_dir / "spare.safetensors"),
                               "loaded": False}  # fmt: skip
    wait_job(server, job(server, steps=1, loras={"spare": 0.5})["id"])
    assert listed()["spare"] == {**before["spare"], "loaded": True}


def test_the_schema_states_the_loras_field_and_its_bounds(server):
    schemas = requests.get(f"{server}/openapi.json", timeout=30).json()["components"]["schemas"]
    for body in ("JobRequest", "OpenAIImageRequest"):
        field = schemas[body]["properties"]["loras"]
        mapping = field["anyOf"][0]
        assert mapping["type"] == "object" and "--lora-dir" in mapping["description"]
        assert (mapping["additionalProperties"]["minimum"], mapping["additionalProperties"]["maximum"]) == (-4, 4)
    assert "<lora:name:scale>" in schemas["A1111Txt2ImgRequest"]["properties"]["prompt"]["description"]


def test_the_cli_reproduces_a_served_lora_image_from_its_png(server, lora_dir, tmp_path, capsys):
    served = tmp_path / "served.png"
    served.write_bytes(image(wait_job(server, job(server, loras={"ink": 0.75})["id"])))
    argv = ["generate", "--from-png", served, "--lora-dir", lora_dir, "--no-safety", "--device", "cpu"]
    status, out, err = run_cli(main, capsys, *argv, "-o", tmp_path / "out")
    assert status == 0, err
    assert np.array_equal(pixels(Path(out.split()[0]).read_bytes()), pixels(served.read_bytes()))
    status, _, err = run_cli(main, capsys, "generate", "--from-png", served, "-o", tmp_path / "none")
    assert status == 2 and "made with LoRA 'ink' (hash " in err and "--lora-dir" in err, err
