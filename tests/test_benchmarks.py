"""The benchmark scripts run end to end on small configs (the full runs are recorded in docs/benchmarks/)."""

import sys
import zipfile

import numpy as np

from benchmarks import gpu


def test_gpu_script_runs_on_cpu_and_both_sides_agree():
    result = gpu.main(["--tiny", "--device", "cpu", "--dtype", "fp32", "--size", "64", "--steps", "2", "--runs", "1"])
    assert result["max_abs_image_difference"] < 1e-4
    assert result["ours"]["latency_s"] > 0 and result["diffusers"]["latency_s"] > 0
    assert result["model_tflop_per_image"] > 0
    phases = {(r["batch"], r["phase"]) for r in result["vram_planner"]}
    assert phases == {(b, p) for b in (1, 2, 4) for p in ("generation", "unet", "vae")}
    assert all(r["measured_gib"] > 0 for r in result["vram_planner"])
    text = gpu.report(result, "python benchmarks/gpu.py --tiny")
    assert "| ours |" in text and "| diffusers |" in text and "| 4 | vae |" in text


def test_gpu_script_sdxl_runs_on_cpu_and_both_sides_agree():
    tiny = ["--model", "sdxl", "--tiny", "--device", "cpu", "--size", "64", "--steps", "2", "--runs", "1"]
    result = gpu.main([*tiny, "--dtype", "fp32", "--planner-batches", "1"])
    assert result["config"] == "tiny SDXL base" and result["max_abs_image_difference"] < 1e-4
    assert result["ours"]["latency_s"] > 0 and result["diffusers"]["latency_s"] > 0
    assert result["model_tflop_per_image"] > 0
    assert {(r["batch"], r["phase"]) for r in result["vram_planner"]} == {(1, p) for p in ("generation", "unet", "vae")}
    assert "# GPU benchmark: SDXL base-shaped" in gpu.report(result, "python benchmarks/gpu.py --model sdxl --tiny")
    # half precision: the U-Net in bf16 on both sides, the decode upcast to float32 (force_upcast) on both
    result = gpu.main([*tiny, "--dtype", "bf16", "--planner-batches", ""])
    assert (result["dtype"], result["vae_dtype"], result["vram_planner"]) == ("bf16", "fp32", [])
    assert result["ours"]["weights_gib"] == result["diffusers"]["weights_gib"]
    assert result["max_abs_image_difference"] < 0.2  # bf16 rounding through two guided steps
    assert "decode in fp32 on both sides" in gpu.report(result, "python benchmarks/gpu.py --model sdxl --tiny")


def test_gpu_script_sdxl_config_is_the_published_base():
    """The full-size SDXL configs build diffusers' 2.57e9-parameter U-Net, and ours holds the same tensors."""
    import torch
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel

    from unnoise.models.io import diffusers_key
    from unnoise.models.unet import UNet, UNetConfig
    from unnoise.models.vae import AutoencoderKL, AutoencoderKLConfig

    kwargs = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    shapes = lambda model, key=str: {key(k): v.shape for k, v in model.state_dict().items()}  # noqa: E731
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**kwargs(gpu.SDXL_UNET))
        assert sum(p.numel() for p in theirs.parameters()) == 2_567_463_684
        assert shapes(UNet(UNetConfig.from_diffusers(gpu.SDXL_UNET))) == shapes(theirs, diffusers_key)
        theirs = DiffusersVAE(**kwargs(gpu.SDXL_VAE))
        assert shapes(AutoencoderKL(AutoencoderKLConfig.from_diffusers(gpu.SDXL_VAE))) == shapes(theirs, diffusers_key)
    assert AutoencoderKLConfig.from_diffusers(gpu.SDXL_VAE).force_upcast and gpu.SDXL_VAE["scaling_factor"] == 0.13025


def test_gpu_script_imports_diffusers_from_a_wheel(tmp_path, monkeypatch):
    wheel = tmp_path / "diffusers-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("diffusers/__init__.py", "FROM_WHEEL = True\n")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    monkeypatch.setattr(sys, "path", list(sys.path))

    def forget_and_import(name, *args, **kwargs):
        if name == "diffusers" and sys.modules.get("diffusers", 0) is None:
            del sys.modules["diffusers"]
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", forget_and_import)
    module = gpu.import_diffusers(str(tmp_path))
    assert module.FROM_WHEEL and str(wheel) in sys.path
    sys.modules.pop("diffusers", None)


def test_upsample_script_runs_on_cpu(capsys):
    from benchmarks import upsample

    upsample.main(["--small", "--runs", "2"])
    out = capsys.readouterr().out
    assert out.count("| 32 | 16->32 | 1 |") == 1 and "VAE decode, fused=True" in out
    diffs = [float(d) for d in __import__("re").findall(r"\((\d\.\de[-+]\d+)\)", out)]
    assert len(diffs) == 4 and max(diffs) < 1e-4


def test_memorisation_nearest_is_the_brute_force_nearest():
    from benchmarks import memorisation

    rng = np.random.default_rng(0)
    queries, reference = rng.random((5, 4, 4)), rng.random((7, 4, 4))
    dist, index = memorisation.nearest(queries, reference)
    brute = np.sqrt(((queries[:, None] - reference[None]) ** 2).sum(axis=(2, 3)))
    np.testing.assert_allclose(dist, brute.min(axis=1), rtol=1e-12)
    assert (index == brute.argmin(axis=1)).all()
    dist, index = memorisation.nearest(reference[[3, 1]], reference)  # a copy is at distance 0 from itself
    assert dist.max() < 1e-12 and index.tolist() == [3, 1]


def test_memorisation_script_runs_on_the_default_model(capsys):
    from benchmarks import memorisation

    result = memorisation.main(["--per-digit", "1", "--quick"])
    assert result["samples"] == 10 and 0 <= result["share_under_val_p1"] <= result["share_under_val_p5"] <= 1
    assert result["min_val"] > 0 and "| held-out digits | 1000 |" in capsys.readouterr().out
