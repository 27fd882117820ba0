"""``unnoise eval`` and ``unnoise eval sweep`` end to end on a tiny random pipeline, the quality benchmark script on a
tiny setting, user errors, and (slow) two torchrun processes against one."""

import builtins
import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port, run_cli
from test_eval import write_digits
from test_serve import build_tiny_pipeline

from benchmarks import quality
from unnoise.eval import cli
from unnoise.pipeline import loading

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.getbasetemp() / "serve-tiny-model")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """30 real training digits: a small held-out set for the floor (mnist-train's 9,000 would take seconds)."""
    return write_digits(tmp_path_factory.mktemp("real") / "train-digits", part="train", count=30)


run = functools.partial(run_cli, cli.main)  # run(capsys, *argv) -> (exit status, stdout, stderr)


def base(model, real, tmp_path, *extra):
    return ["--model", model, "-n", 10, "--reference", "mnist-val", "--floor", real,
            "--cache-dir", tmp_path / "cache", "--device", "cpu", *extra]  # fmt: skip


def test_eval_end_to_end_writes_json_and_markdown_with_the_floor(capsys, model, real, tmp_path):
    code, out, err = run(capsys, *base(model, real, tmp_path, "--steps", 2, "--out", tmp_path / "out"))
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "eval.json").read_text())
    m = record["metrics"]
    assert set(m) == {"fid", "fid_floor", "kid", "precision", "recall", "adherence"}
    assert m["fid"] > 0 and 0 <= m["precision"] <= 1 and 0 <= m["adherence"]["overall"] <= 1
    assert np.asarray(m["adherence"]["confusion"]).sum(1).tolist() == [1] * 10
    assert m["fid_floor"]["n"] == 10 and m["fid_floor"]["subsets"] == 3 and m["fid_floor"]["held_out"] == str(real)
    assert record["settings"] == {"sampler": "euler", "steps": 2, "guidance_scale": 2.0, "spacing": "leading", "nfe": 2}
    assert record["reference"]["name"] == "mnist-val" and record["reference"]["count"] == 1000
    assert record["feature_space"].startswith("mnist-classifier-") and record["num_images"] == 10
    markdown = (tmp_path / "out" / "eval.md").read_text()
    assert f"| FID | {m['fid']:.3f} | {m['fid_floor']['mean']:.3f} ± " in markdown
    assert "Adherence per prompted digit" in markdown
    assert f"real-vs-real floor {m['fid_floor']['mean']:.3f}" in out


def test_eval_of_an_image_folder_reads_digit_labels_from_png_parameters(capsys, real, tmp_path):
    images = write_digits(tmp_path / "generated", part="val", count=20, prompts=True)
    argv = ["--images", images, "--metrics", "fid,adherence", "--reference", "mnist-val", "--floor", real]
    code, _, err = run(capsys, *argv, "--cache-dir", tmp_path / "cache", "--device", "cpu", "--out", tmp_path / "o")
    assert code == 0, err
    record = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert record["source"] == {"images": str(images)} and record["settings"] is None
    assert record["metrics"]["adherence"]["overall"] >= 0.9  # real digits, read by a 99%-accurate classifier


def test_sweep_writes_table_and_plots_and_no_plots_skips_them(capsys, model, real, tmp_path):
    argv = base(model, real, tmp_path, "--metrics", "fid,adherence", "--out", tmp_path / "sweep")
    code, out, err = run(capsys, "sweep", *argv, "--samplers", "euler", "--steps", "1,2", "--guidance", "1,2")
    assert code == 0, err
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    settings = [(p["settings"]["steps"], p["settings"]["guidance_scale"]) for p in record["points"]]
    assert settings == [(1, 1.0), (1, 2.0), (2, 1.0), (2, 2.0)]
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| sampler | steps | NFE | guidance | FID | adherence | seconds |" in table
    assert "real-vs-real FID floor: " in table and "![FID against NFE](fid_vs_nfe.png)" in table
    for name in ("fid_vs_nfe.png", "fid_vs_adherence.png"):
        assert (tmp_path / "sweep" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[4/4] euler 2 steps, guidance 2: FID" in err
    argv = base(model, real, tmp_path, "--metrics", "fid", "--out", tmp_path / "table", "--no-plots")
    code, out, err = run(capsys, "sweep", *argv, "--steps", "1,2")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "table").iterdir()) == ["sweep.json", "sweep.md"]


def test_sweep_without_matplotlib_says_how_to_get_it(capsys, model, real, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, _, err = run(capsys, "sweep", *base(model, real, tmp_path, "--out", tmp_path / "o"))
    assert code == 2 and "argument --no-plots: PNG plots need matplotlib" in err and "pip install matplotlib" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--metrics", "fid,fdi"], "argument --metrics: metrics: 'fdi' is not a metric; allowed: fid, kid, pr, adh"),
        (["--prompts", "PROMPTS", "--metrics", "adherence"], "argument --metrics: adherence needs digit prompts"),
        (["--reference", "nowhere"], "argument --reference: --reference='nowhere' is not allowed (not found)"),
        (["--floor", "nowhere.npz"], "argument --floor: --floor='nowhere.npz' is not allowed"),
        (["--classifier", "NOWHERE"], "argument --classifier: no MNIST classifier in"),
        (["--features", "inception"], "argument --inception-weights: no FID Inception weights given"),
        (["--metrics", "fid,is", "--inception-weights", "NOWHERE"], "argument --inception-weights: FID Inception"),
        (["--metrics", "clip"], "argument --clip: the CLIP score needs a CLIP model folder"),
        (["-n", "15"], "argument -n: num_images=15 is not allowed; digit prompts need a multiple of 10"),
        (["--steps", "0"], "argument --steps: steps=0 is not allowed"),
        (["--images", "IMAGES"], "argument --images: not allowed with --model"),
        (["--no-out"], "argument --out: required"),
    ],
)
def test_user_errors_are_one_line_naming_the_flag(capsys, model, real, tmp_path, monkeypatch, extra, message):
    monkeypatch.delenv("UNNOISE_INCEPTION_WEIGHTS", raising=False)
    (tmp_path / "prompts.txt").write_text("a cat\n")
    names = {"PROMPTS": tmp_path / "prompts.txt", "NOWHERE": tmp_path / "nowhere", "IMAGES": real}
    extra = [names.get(a, a) for a in extra]
    out = [] if "--no-out" in extra else ["--out", tmp_path / "o"]
    code, _, err = run(capsys, *base(model, real, tmp_path, *[a for a in extra if a != "--no-out"], *out))
    assert code == 2 and message in err, err
    assert not (tmp_path / "o").exists()


def test_missing_default_model_names_model_flag(capsys, real, tmp_path, monkeypatch):
    monkeypatch.setitem(loading.EMBEDDED_MODELS, "default", tmp_path / "absent")
    code, _, err = run(capsys, "-n", 10, "--reference", "mnist-val", "--floor", real, "--out", tmp_path / "o")
    assert code == 2 and "argument --model: the embedded default model is missing" in err


def test_sweep_rejects_flags_of_a_single_eval(capsys, model, real, tmp_path):
    code, _, err = run(capsys, "--steps", 3, "sweep", *base(model, real, tmp_path, "--out", tmp_path / "o"))
    assert code == 2 and "argument --steps: belongs to `unnoise eval`" in err


def test_options_before_the_word_sweep_are_kept(model, real, tmp_path):
    parser = cli.argparse.ArgumentParser(prog="unnoise")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--seed", "7", "sweep", "-n", "20", "--steps", "1,2"])
    assert (args.seed, args.num_images, args.sweep_steps, args.run) == (7, 20, [1, 2], cli.sweep_command)
    args = parser.parse_args(["eval", "--seed", "7"])
    assert args.run is cli.eval_command and args.reference == "mnist-train"


def test_quality_benchmark_runs_end_to_end_on_a_tiny_setting(model, real, tmp_path):
    argv = ["--model", model, "-n", 10, "--samplers", "euler,ddim", "--nfe", "1,2", "--guidance", "1,2",
            "--guidance-steps", 2, "--reference", "mnist-val", "--held-out", real, "--cache-dir", tmp_path / "c",
            "--out", tmp_path / "docs"]  # fmt: skip
    record = quality.main([str(a) for a in argv])
    assert len(record["points"]) == 5  # 2 samplers x 2 NFE at guidance 2, plus euler at 2 steps with guidance 1
    report = (tmp_path / "docs" / "quality.md").read_text()
    assert "Produced by `python benchmarks/quality.py`" in report and "Real-vs-real floor." in report
    assert "| euler | " in report and "| ddim | " in report and "quality-fid-vs-nfe.png" in report
    assert (tmp_path / "docs" / "quality-fid-vs-adherence.png").is_file()
    assert json.loads((tmp_path / "docs" / "quality.json").read_text())["command"] == quality.COMMAND


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(capsys, model, real, tmp_path):
    argv = [str(a) for a in base(model, real, tmp_path, "-n", 20, "--steps", 2)]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), "-m", "unnoise.eval", *argv, "--out", str(tmp_path / "two")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "one")
    assert code == 0, err
    one, two = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert one["metrics"] == two["metrics"]  # image k has seed k wherever it is made
