"""The ``unnoise`` command: generate writes PNGs with parameters and a grid, --from-png reproduces an image
bit-exactly, user errors are one line with exit status 2, Ctrl-C exits with 130, the module runs as a script."""

import functools
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import transformers
from helpers import SD_SCHEDULE, free_port, run_cli, tiny_components
from PIL import Image

from unnoise import cli
from unnoise.models.lora import LoRAAdapter, lora_hash, save_lora
from unnoise.pipeline import Pipeline, loading
from unnoise.pipeline.png import read_png_parameters, save_png
from unnoise.serve.config import ServeConfig
from unnoise.serve.engine import Engine
from unnoise.serve.store import SqliteStore

SIZE = 32  # the tiny model's latent factor is 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random Stable Diffusion folder in the diffusers layout, with an Euler scheduler."""
    sd = diffusers.StableDiffusionPipeline(
        **tiny_components(tmp_path_factory.mktemp("tokenizer")),
        scheduler=diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading", steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("model")
    sd.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", autouse=True)
def quiet_transformers():
    """No "Loading weights" bar from transformers, which is already imported here (a fresh ``unnoise`` process
    turns it off through the environment before importing it; test_module_runs_as_a_script checks that)."""
    logging = transformers.utils.logging
    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # what main() sets, restored after
        yield
    if enabled:
        logging.enable_progress_bar()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Input files: an image, a mask of its size, one of another size, a text file, a PNG without parameters."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), mode="RGB").save(folder / "image.png")
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, : SIZE // 2] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.new("L", (16, 16)).save(folder / "small_mask.png")
    (folder / "notes.txt").write_text("not an image")
    Image.new("RGB", (SIZE, SIZE)).save(folder / "plain.png")
    return {p.stem: str(p) for p in folder.iterdir()}


run = functools.partial(run_cli, cli.main)  # run(capsys, *argv) -> (exit status, stdout, stderr)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def generate(capsys, model, out, *argv) -> tuple[list[str], str]:
    """Run ``unnoise generate --model MODEL -o OUT ARGV``: (printed paths, stderr)."""
    status, stdout, stderr = run(capsys, "generate", "--model", model, "-o", out, "--device", "cpu", *argv)
    assert status == 0, stderr
    return stdout.split(), stderr


def test_blocked_prompt_exits_2_naming_the_category_unless_safety_is_off(capsys, model, tmp_path):
    status, _, stderr = run(capsys, "generate", "a naked woman", "--model", model, "-o", tmp_path, "--steps", 1)
    assert status == 2 and "argument prompt:" in stderr and "category sexual" in stderr
    assert list(tmp_path.iterdir()) == []
    status, stdout, _ = run(
        capsys, "generate", "a naked woman", "--model", model, "-o", tmp_path, "--steps", 1, "--no-safety"
    )
    assert status == 0 and stdout.count(".png") == 1
    assert "Watermark" not in read_png_parameters(stdout.split()[0])["extra"]


def test_generate_writes_pngs_grid_and_progress(capsys, model, tmp_path):
    out = tmp_path / "out"
    paths, stderr = generate(capsys, model, out, "a cat", "-n", 2, "--steps", 2, "--size", "32x32", "--seed", 5)
    assert paths == [str(out / name) for name in ("00000-5.png", "00001-6.png", "grid-00000.png")]
    for i, path in enumerate(paths[:2]):
        p = read_png_parameters(path)
        assert (p["prompt"], p["steps"], p["seed"], p["width"], p["height"]) == ("a cat", 2, 5 + i, SIZE, SIZE)
        assert (p["batch_size"], p["batch_pos"]) == (2, i)
        # the safety stage's provenance: 32 px is too small to carry the watermark, and says so
        assert p["extra"] == {"Watermark": "none (32x32 is below the 256 px minimum side)", "Image filter": "off"}
    grid = pixels(paths[2])
    assert grid.shape == (SIZE, 2 * SIZE, 3)
    assert np.array_equal(grid[:, SIZE:], pixels(paths[1])) and not np.array_equal(grid[:, :SIZE], grid[:, SIZE:])
    assert "\rsampling [" in stderr and "] 2/2 steps" in stderr and stderr.endswith("\n")
    paths, _ = generate(capsys, model, out, "a dog", "--steps", 1, "--size", "32x32", "--seed", 1)
    assert paths == [str(out / "00002-1.png")]  # numbered on, a single image has no grid


def test_from_png_reproduces_bit_exactly_and_flags_override(capsys, model, tmp_path):
    out = tmp_path / "out"
    argv = ("a cat", "-n", 2, "--steps", 3, "--size", "32x32", "--seed", 5, "--negative", "dog", "--sampler", "euler_a")
    first, second, _ = generate(capsys, model, out, *argv)[0]
    again = generate(capsys, model, out, "--from-png", second)[0]
    assert again == [str(out / "00002-6.png")]
    assert np.array_equal(pixels(again[0]), pixels(second))
    assert read_png_parameters(again[0]) == read_png_parameters(second)
    changed = generate(capsys, model, out, "--from-png", first, "--steps", 2, "a dog")[0]
    p = read_png_parameters(changed[0])
    assert (p["prompt"], p["negative_prompt"], p["steps"], p["seed"], p["sampler"]) == ("a dog", "dog", 2, 5, "euler_a")


def test_img2img_and_inpainting_from_png(capsys, model, files, tmp_path):
    out = tmp_path / "out"
    argv = ("--init-image", files["image"], "--mask", files["mask"], "--strength", 0.75, "--steps", 4, "--seed", 2)
    made = generate(capsys, model, out, "a cat", *argv)[0][0]
    assert read_png_parameters(made)["strength"] == 0.75
    again = generate(capsys, model, out, "--from-png", made, "--init-image", files["image"], "--mask", files["mask"])
    assert np.array_equal(pixels(again[0][0]), pixels(made))
    status, _, stderr = run(capsys, "generate", "--model", model, "--from-png", made)
    assert status == 2 and "argument --from-png:" in stderr and "--init-image" in stderr


def test_from_png_warns_about_settings_it_cannot_apply(capsys, model, tmp_path):
    image = Image.new("RGB", (SIZE, SIZE))
    image.info["parameters"] = (
        "a cat\nSteps: 1, Sampler: Euler, Seed: 3, Size: 32x32, Model hash: 0123456789, Version: v1"
    )
    save_png(image, tmp_path / "a1111.png")
    paths, stderr = generate(capsys, model, tmp_path / "out", "--from-png", tmp_path / "a1111.png")
    assert "hash 0123456789" in stderr and "the image will differ" in stderr and "['Version'] are not applied" in stderr
    assert read_png_parameters(paths[0])["seed"] == 3


@pytest.fixture(scope="module")
def loras(model, tmp_path_factory) -> dict[str, Path]:
    """Two LoRA files for the tiny model, both named ``ink`` (a folder each) with different weights, random ``up``
    (a new adapter starts as the identity)."""
    pipe = Pipeline.from_pretrained(model)
    networks = {"unet": pipe.unet, "text_encoder": pipe.text_encoder.lora_root()}
    files = {}
    for seed, key in enumerate(("ink", "other_ink")):
        g = torch.Generator().manual_seed(seed)
        adapter = LoRAAdapter.create(networks, rank=2, alpha=2, generator=g)
        with torch.no_grad():
            for layer in adapter.layers.values():
                layer.up.normal_(0, 0.5, generator=g)
        files[key] = save_lora(adapter, tmp_path_factory.mktemp(key) / "ink.safetensors")
    return files


def test_lora_flag_and_from_png_reproduce_an_image_made_with_a_lora(capsys, model, loras, tmp_path):
    out, ink = tmp_path / "out", loras["ink"]
    argv = ("a cat", "--steps", 3, "--size", "32x32", "--seed", 5, "--no-safety")
    [base], _ = generate(capsys, model, out, *argv)
    [made], _ = generate(capsys, model, out, *argv, "--lora", f"{ink}:0.8")
    p = read_png_parameters(made)
    assert (p["prompt"], p["loras"], p["lora_hashes"]) == ("a cat", {"ink": 0.8}, {"ink": lora_hash(ink)})
    assert not np.array_equal(pixels(made), pixels(base))
    [again], stderr = generate(capsys, model, out, "--from-png", made, "--lora-dir", ink.parent, "--no-safety")
    assert np.array_equal(pixels(again), pixels(made)) and "warning" not in stderr
    assert read_png_parameters(again) == p
    [named], _ = generate(capsys, model, out, *argv, "--lora-dir", ink.parent, "--lora", "ink:0.8")  # by name
    assert np.array_equal(pixels(named), pixels(made))
    [half], _ = generate(capsys, model, out, "--from-png", made, "--lora", f"{ink}:0.5", "--no-safety")  # override
    assert read_png_parameters(half)["loras"] == {"ink": 0.5} and not np.array_equal(pixels(half), pixels(made))


def test_from_png_refuses_a_lora_it_cannot_find_or_whose_file_differs(capsys, model, loras, tmp_path):
    out = tmp_path / "out"
    argv = ("a cat", "--steps", 2, "--size", "32x32", "--seed", 1, "--no-safety", "--lora", loras["ink"])
    [made], _ = generate(capsys, model, out, *argv)
    recorded, other = lora_hash(loras["ink"]), lora_hash(loras["other_ink"])
    status, _, stderr = run(capsys, "generate", "--model", model, "--from-png", made, "-o", out)
    assert status == 2 and stderr.count("\n") == 1, stderr
    assert f"argument --from-png: {made} was made with LoRA 'ink' (hash {recorded}), which is not a --lora" in stderr
    wrong = loras["other_ink"]  # same name, other weights: found by name it is no reproduction
    status, _, stderr = run(capsys, "generate", "--model", model, "--from-png", made, "--lora-dir", wrong.parent)
    assert status == 2 and stderr.count("\n") == 1, stderr
    expected = f"argument --lora-dir: {made} was made with LoRA 'ink' of hash {recorded}, but {wrong} has hash {other}"
    assert expected in stderr, stderr
    [chosen], stderr = generate(capsys, model, out, "--from-png", made, "--lora", wrong, "--no-safety")  # named
    assert f"but {wrong} has hash {other}; the image will differ" in stderr
    assert read_png_parameters(chosen)["lora_hashes"] == {"ink": other}


BAD = [
    (["--size", "36x32"], r"argument --size: width=36 is not allowed; .*multiple of 8"),
    (["--size", "512x"], r"argument --size: '512x' is not a size; expected WIDTHxHEIGHT"),
    (["--steps", "0"], r"argument --steps: steps=0 is not allowed; .*from 1 to the 1000"),
    (["--steps", "two"], r"argument --steps: invalid int value: 'two'"),
    (["--sampler", "plms"], r"argument --sampler: invalid choice: 'plms' \(choose from '?ddpm'?, .*euler_a"),
    (["-n", "0"], r"argument -n: num_images=0 is not allowed; expected an integer >= 1"),
    (["--init-image", "notes"], r"argument --init-image: image='.*notes.txt' .*not a readable image file"),
    (["--init-image", "image", "--mask", "small_mask"], r"argument --mask: mask=.*16x16 differs from .*32x32"),
    (["--mask", "mask"], r"argument --mask: mask=.* needs an image"),
    (["--init-image", "image", "--strength", "1.5"], r"argument --strength: strength=1.5 .*\(0, 1\]"),
    (["--strength", "0.5"], r"argument --strength: 0.5 applies to --init-image, which is not given"),
    (["--model", "notes"], r"argument --model: .*notes.txt is a file but not a single-file checkpoint; allowed: "),
    (["--device", "gpu0"], r"argument --device: .*gpu0"),
    (["--from-png", "notes"], r"argument --from-png: cannot identify image file"),
    (["--from-png", "plain"], r"argument --from-png: .*plain.png has no 'parameters' text chunk"),
    (["--from-png", "missing.png"], r"argument --from-png: .*No such file"),
    (["--lora", "missing.safetensors"], r"argument --lora: 'missing.safetensors' is not a file \(a LoRA name needs "),
    (["--lora", "x.safetensors:inf"], r"argument --lora: 'x.safetensors:inf': scale 'inf' is not allowed; .*finite"),
    (["--lora", "notes"], r"argument --lora: LoRA file .*notes.txt is not .safetensors"),
    (["--lora-dir", "notes"], r"argument --lora-dir: .*notes.txt is not a folder"),
]


@pytest.mark.parametrize("argv, match", BAD, ids=[f"{a[0]}-{i}" for i, (a, _) in enumerate(BAD)])
def test_bad_input_is_one_line_naming_the_argument(capsys, model, files, tmp_path, argv, match):
    argv = [files.get(a, a) for a in argv]
    prompt = [] if "--from-png" in argv else ["a cat"]
    status, stdout, stderr = run(capsys, "generate", "--model", model, "-o", tmp_path, "--steps", 2, *prompt, *argv)
    assert status == 2 and stdout == ""
    assert stderr.startswith("unnoise generate: error: ") and stderr.count("\n") == 1, stderr
    assert re.search(match, stderr), stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_command_prompt_and_default_model(capsys, monkeypatch, tmp_path):
    status, _, stderr = run(capsys)
    assert status == 2 and stderr == "unnoise: error: the following arguments are required: COMMAND\n"
    status, _, stderr = run(capsys, "generate", "--steps", 2)
    assert (
        status == 2 and stderr == "unnoise generate: error: argument prompt: required unless --from-png FILE is given\n"
    )
    monkeypatch.setitem(loading.EMBEDDED_MODELS, "default", tmp_path / "default_model")
    status, _, stderr = run(capsys, "generate", "a seven")
    assert status == 2 and stderr.count("\n") == 1
    assert "argument --model: the embedded default model is missing" in stderr
    assert "pass --model DIR" in stderr


def test_ctrl_c_exits_130_without_traceback(capsys, model, monkeypatch, tmp_path):
    def interrupt(self, step, *_):
        if step == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.ProgressBar, "__call__", interrupt)
    status, stdout, stderr = run(capsys, "generate", "a cat", "--model", model, "-o", tmp_path, "--steps", 3)
    assert status == 130 and stdout == "" and stderr == "\nunnoise generate: cancelled\n"
    assert list(tmp_path.iterdir()) == []


def test_module_runs_as_a_script(model):
    def unnoise(*argv):
        return subprocess.run([sys.executable, "-m", "unnoise.cli", *argv], capture_output=True, text=True)

    done = unnoise("generate", "--help")
    assert done.returncode == 0 and "--from-png FILE" in done.stdout
    done = unnoise("generate", "a cat", "--model", model, "--size", "32x20")  # loads the model: nothing else printed
    expected = "unnoise generate: error: argument --size: height=20 is not allowed; expected a positive multiple of 8"
    assert done.returncode == 2 and done.stderr.startswith(expected) and done.stderr.count("\n") == 1, done.stderr


# -- a model that cannot be loaded: one line naming the file and what is wrong, exit status 2 ------------------------


@pytest.fixture(scope="module")
def ours(model, tmp_path_factory):
    """The tiny model in our format (pipeline.json, unet/ and vae/ in our model format, CLIP folders)."""
    folder = tmp_path_factory.mktemp("ours")
    Pipeline.from_pretrained(model).save_pretrained(folder)
    return folder


def _garble(path):
    path.write_bytes(b"\xff" * 64)  # not UTF-8; as safetensors, a header length of 2**64 - 1


def _drop_vae(path):
    index = json.loads(path.read_text())
    del index["vae"]
    path.write_text(json.dumps(index))


NOT_UTF8 = "is not UTF-8 text: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"
NOT_SAFETENSORS = "is not a readable safetensors file: Error while deserializing header: header too large"
# case -> (format, the file or folder to break, how, the message after "argument --model: ")
UNLOADABLE = {
    "corrupt-safetensors": ("ours", "unet/model.safetensors", _garble, "{path} " + NOT_SAFETENSORS),
    "corrupt-diffusers-safetensors": ("diffusers", "vae/diffusion_pytorch_model.safetensors", _garble,
                                      "{path} " + NOT_SAFETENSORS),
    "nonexistent-folder": ("diffusers", ".", shutil.rmtree, "{path} does not exist"),
    "non-utf8-model-index": ("diffusers", "model_index.json", _garble, "{path} " + NOT_UTF8),
    "non-utf8-pipeline-json": ("ours", "pipeline.json", _garble, "{path} " + NOT_UTF8),
    "non-utf8-scheduler-config": ("diffusers", "scheduler/scheduler_config.json", _garble, "{path} " + NOT_UTF8),
    "partial-diffusers-folder": ("diffusers", "model_index.json", _drop_vae,
        "{path}: components ['vae'] are missing; this folder needs each of ['unet', 'vae', "
        "'text_encoder', 'tokenizer', 'scheduler'] as [library, class]"),
    "missing-config": ("diffusers", "unet/config.json", Path.unlink, "{path} does not exist"),
    "missing-weights": ("diffusers", "unet/diffusion_pytorch_model.safetensors", Path.unlink,
        "{path} does not exist (nor diffusion_pytorch_model.fp16.safetensors, diffusion_pytorch_model.bin)"),
    "missing-tokenizer": ("diffusers", "tokenizer", shutil.rmtree, "{path} does not exist"),
}  # fmt: skip


def unloadable(case, model, ours, folder) -> str:
    """Copy the tiny model in ``case``'s format to ``folder``, break it as ``case`` says; the expected message."""
    kind, part, breaks, message = UNLOADABLE[case]
    shutil.copytree(ours if kind == "ours" else model, folder)
    path = (folder / part).resolve()
    breaks(path)
    return message.format(path=path)


@pytest.mark.parametrize("case", UNLOADABLE)
def test_unloadable_model_is_one_line_naming_the_file(capsys, model, ours, tmp_path, case):
    message = unloadable(case, model, ours, tmp_path / "model")
    argv = ["a cat", "--model", tmp_path / "model", "-o", tmp_path / "out", "--steps", 1]
    status, stdout, stderr = run(capsys, "generate", *argv)
    assert (status, stdout, stderr) == (2, "", f"unnoise generate: error: argument --model: {message}\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["corrupt-safetensors", "nonexistent-folder"])
def test_eval_reports_an_unloadable_model_as_generate_does(capsys, model, ours, tmp_path, case):
    message = unloadable(case, model, ours, tmp_path / "model")
    argv = ["--model", tmp_path / "model", "-n", 10, "--metrics", "adherence", "--device", "cpu", "--out", tmp_path]
    status, _, stderr = run(capsys, "eval", *argv)
    assert (status, stderr) == (2, f"unnoise eval: error: argument --model: {message}\n")


def test_serve_checks_the_model_folder_before_starting(capsys, model, ours, tmp_path):
    message = unloadable("nonexistent-folder", model, ours, tmp_path / "model")
    status, _, stderr = run(capsys, "serve", "--model", tmp_path / "model", "--db", tmp_path / "jobs.sqlite3")
    assert (status, stderr) == (2, f"unnoise serve: error: argument --model: {message}\n")


def test_serve_reports_a_model_it_cannot_load_in_one_line(model, ours, tmp_path):
    """What can only be found by loading (in the background, while the server answers) /ready reports."""
    message = unloadable("corrupt-safetensors", model, ours, tmp_path / "model")
    config = ServeConfig(model=tmp_path / "model", db=tmp_path / "jobs.sqlite3", warmup=False, safety=False)
    engine = Engine(config, SqliteStore(config.db))
    engine.start()
    deadline = time.monotonic() + 60
    while engine.load_error is None and not engine.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    engine.stop()
    assert engine.load_error == f"ValueError: {message}"


def test_serve_exits_2_with_one_error_line_for_a_model_it_cannot_load(model, ours, tmp_path):
    """The process: no traceback, the loaders' line as `unnoise generate` prints it, exit status 2."""
    message = unloadable("corrupt-safetensors", model, ours, tmp_path / "model")
    command = [sys.executable, "-m", "unnoise.serve", "--model", tmp_path / "model", "--port", free_port(), "--db",
               tmp_path / "jobs.sqlite3", "--no-warmup", "--no-safety"]  # fmt: skip
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"unnoise serve: error: argument --model: {message}\n" in result.stderr
