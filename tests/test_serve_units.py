"""Serving pieces without HTTP: the VRAM planner against the PyTorch profiler, batching equals unbatched, the SQLite
store across restarts, the metrics format, API keys, validation messages."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from test_serve import build_tiny_pipeline, parse_prometheus

from unnoise import Pipeline
from unnoise.models.lora import LoRAAdapter
from unnoise.models.packing import (
    conv_backend,
    kept_packed_bytes,
    onednn_runs,
    packed_weight_bytes,
    prepare_for_inference,
    set_weight_packing,
)
from unnoise.serve.app import KeyCheck
from unnoise.serve.config import ServeConfig
from unnoise.serve.metrics import Counter, Histogram, ServerMetrics
from unnoise.serve.validation import FIELDS_NATIVE, ApiError, build_spec
from unnoise.serve.vram import VramPlanner, measured_activations, module_bytes

MIB = 2**20


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.from_pretrained(build_tiny_pipeline(tmp_path_factory.getbasetemp() / "serve-tiny-model"))


# -- VRAM planner ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_pipe(pipe):
    half = copy.deepcopy(pipe)
    half.unet.to(torch.bfloat16), half.vae.to(torch.bfloat16)
    return half


@pytest.mark.parametrize(
    "dtype, batch, size, packed",
    [(d, b, s, True) for d in ("float32", "bfloat16") for b, s in ((1, 64), (2, 128), (1, 256))]
    + [("float32", 2, 128, False), ("float32", 1, 256, False), ("bfloat16", 2, 128, False)]
    + [("bfloat16", 1, 256, False), ("float32", 2, 128, "in_place"), ("bfloat16", 1, 256, "in_place")],
)
def test_planner_bounds_the_profiled_peak_on_cpu(pipe, bf16_pipe, dtype, batch, size, packed):
    """The estimate of each phase is at least the profiler's peak and, above a few MiB, at most twice it; in
    bfloat16 as well (GroupNorm's float32 statistics, half-size activations), with the conv/linear weights packed
    for oneDNN beside the plain ones, in place of them (``prepare_for_inference``, the Pipeline's default) and not
    at all. Which convolution kernel runs depends on the CPU (bf16 packs only where oneDNN has bf16 kernels, AVX-512
    or AMX; elsewhere PyTorch unfolds the input, im2col): the planner models each (``packing.conv_backend``), so the
    same bounds hold on every CPU."""
    pipe = copy.deepcopy(bf16_pipe if dtype == "bfloat16" else pipe)
    if packed == "in_place":
        prepare_for_inference(pipe.unet), prepare_for_inference(pipe.vae)
    else:
        set_weight_packing(pipe.unet, packed), set_weight_packing(pipe.vae, packed)
    dtype = getattr(torch, dtype)
    planner = VramPlanner(pipe, budget=2**40, max_batch=64)
    estimate = planner.estimate(batch, size, size)
    h = size // pipe.vae_factor
    x = torch.randn(2 * batch, 4, h, h, dtype=dtype)
    context = torch.randn(2 * batch, pipe.text_encoder.max_length, pipe.text_encoder.dim, dtype=dtype)
    t = torch.full((2 * batch,), 500.0)
    z = torch.randn(batch, 4, h, h, dtype=dtype)
    with torch.no_grad():  # warm up: what the first call keeps (reordered weights) is in the planner's weights
        pipe.unet(x, t, encoder_hidden_states=context), pipe.vae.decode(z)
    assert (packed_weight_bytes(pipe.unet) > 0) == (packed is True and onednn_runs(dtype, "cpu"))
    assert kept_packed_bytes(pipe.unet) == packed_weight_bytes(pipe.unet)
    unet = measured_activations(lambda: pipe.unet(x, t, encoder_hidden_states=context), "cpu")
    vae = measured_activations(lambda: pipe.vae.decode(z), "cpu")
    print(f"{dtype} {batch}x{size}px packed={packed} ({conv_backend(pipe.vae)}): U-Net {estimate.unet / unet:.2f}x "
          f"of {unet / MIB:.1f} MiB, VAE {estimate.vae / vae:.2f}x of {vae / MIB:.1f} MiB")  # fmt: skip
    for estimated, measured in ((estimate.unet, unet), (estimate.vae, vae)):
        assert estimated >= measured
        assert measured < 4 * MIB or estimated <= 2 * measured


def test_planner_counts_the_packed_weights_a_cpu_call_keeps(pipe):
    """The planner's weights include the reordered copies that an inference call leaves on the CPU layers."""
    pipe = copy.deepcopy(pipe)
    set_weight_packing(pipe.unet, True)  # beside the weights (the Pipeline's default packs them in place)
    expected = packed_weight_bytes(pipe.unet)
    assert expected > 0 and VramPlanner(pipe, 2**40, 8).weights >= module_bytes(pipe.unet, pipe.vae) + expected
    with torch.no_grad():
        context = torch.randn(2, pipe.text_encoder.max_length, pipe.text_encoder.dim)
        pipe.unet(torch.randn(2, 4, 8, 8), torch.full((2,), 500.0), encoder_hidden_states=context)
    assert kept_packed_bytes(pipe.unet) == expected


def test_planner_counts_lora_adapters_as_they_come_and_go(pipe):
    """Adapters sit beside the networks' parameters; fused, the base weights kept for unfuse count too."""
    pipe = copy.deepcopy(pipe)
    planner = VramPlanner(pipe, 2**40, 8)
    base = planner.weights
    networks = {"unet": pipe.unet, "text_encoder": pipe.text_encoder.lora_root()}
    adapter = LoRAAdapter.create(networks, rank=4, alpha=4.0, generator=torch.Generator().manual_seed(0))
    pipe.add_lora(adapter, "a")
    adapter_bytes = sum(p.numel() * p.element_size() for p in adapter.parameters())
    assert planner.weights == base + adapter_bytes
    targets = dict(pipe.unet.named_modules()) | dict(pipe.text_encoder.lora_root().named_modules())
    saved = sum(targets[path].weight.numel() * 4 for _, path in adapter.targets.values())
    pipe.fuse_lora()
    assert planner.weights == base + adapter_bytes + saved
    pipe.unload_lora()
    assert planner.weights == base


def test_planner_combines_the_figures_the_networks_report(pipe):
    planner = VramPlanner(pipe, budget=2**40, max_batch=8)
    estimate, h = planner.estimate(2, 128, 128), 128 // pipe.vae_factor
    assert estimate.unet == pipe.unet.activation_bytes(4, h, h, pipe.text_encoder.max_length)  # the guidance batch
    assert estimate.vae == pipe.vae.decode_activation_bytes(2, h, h)
    assert planner.weights == pipe.unet.resident_bytes() + pipe.vae.resident_bytes() + module_bytes(pipe.text_encoder)


def test_planner_picks_the_largest_batch_under_the_budget(pipe):
    planner = VramPlanner(pipe, budget=2**40, max_batch=8)
    assert planner.max_batch(32, 32) == 8  # the server's --max-batch bounds it
    peak = [planner.estimate(b, 256, 256).peak for b in range(1, 5)]
    assert peak == sorted(peak) and peak[0] > planner.weights
    tight = VramPlanner(pipe, budget=(peak[1] + peak[2]) // 2, max_batch=8)
    assert tight.max_batch(256, 256) == 2
    assert VramPlanner(pipe, budget=planner.weights, max_batch=8).max_batch(256, 256) == 0
    assert "GiB" in planner.estimate(1, 256, 256).describe()


def test_413_names_the_largest_batch_that_fits(pipe):
    budget = VramPlanner(pipe, budget=2**40, max_batch=8).estimate(2, 256, 256).peak
    planner = VramPlanner(pipe, budget=budget, max_batch=8)
    values = dict(prompt="x", n=3, width=256, height=256)
    with pytest.raises(ApiError) as error:
        build_spec(values, {**FIELDS_NATIVE, "n": "batch_size"}, ServeConfig(), pipe, planner)
    assert error.value.status == 413 and "at most batch_size=2 fits" in error.value.message


# -- batching ------------------------------------------------------------------------------------------------------


def test_specs_of_one_batch_key_generate_as_each_alone(pipe):
    """The server's specs batch by the pipeline's key and run through its public call, as each would alone."""
    values = dict(prompt="a seven", n=2, steps=5, sampler="euler_a", guidance_scale=2.0, seed=10)
    a = build_spec(values, FIELDS_NATIVE, ServeConfig(), pipe)
    b = build_spec({**values, "prompt": "a three", "negative_prompt": "blurry", "n": 1, "seed": 99}, FIELDS_NATIVE,
                   ServeConfig(), pipe)  # fmt: skip
    c = build_spec({**values, "steps": 6}, FIELDS_NATIVE, ServeConfig(), pipe)
    assert a.batch_key == b.batch_key != c.batch_key
    for spec, images in zip((a, b), pipe.generate([a.resolved, b.resolved]), strict=True):
        alone = pipe.generate([spec.resolved])[0]
        for got, want in zip(images, alone, strict=True):
            assert got.info["parameters"] == want.info["parameters"]
            assert np.abs(np.asarray(got, float) - np.asarray(want, float)).max() <= 1
    with pytest.raises(ValueError, match=r"^requests\[1\]\.steps=6 is not allowed; requests generated together share"):
        pipe.generate([a.resolved, c.resolved])


def test_pipeline_check_relabels_the_field(pipe, monkeypatch):
    """What only the pipeline rejects gets a 422 naming the API's field."""

    def reject(pipe, args):
        raise ValueError("num_images=1 is not allowed; some model-specific reason")

    monkeypatch.setattr("unnoise.serve.validation.resolve_request", reject)
    with pytest.raises(ApiError) as error:
        build_spec(dict(prompt="x"), {**FIELDS_NATIVE, "n": "batch_size"}, ServeConfig(), pipe)
    assert error.value.status == 422 and error.value.param == "batch_size"
    assert error.value.message == "batch_size=1 is not allowed; some model-specific reason"


# -- metrics, keys, config -------------------------------------------------------------------------------------------


def test_metrics_render_prometheus_text():
    metrics = ServerMetrics(queue_depth=lambda: 3, running=lambda: 1, ready=lambda: 1.0)
    metrics.requests.inc(route="/v1/jobs", status="202")
    metrics.requests.inc(route="/v1/jobs", status="202")
    metrics.batch_size.observe(3)
    metrics.step_seconds.observe(100.0)  # above every bucket
    values = parse_prometheus(metrics.render())
    assert values['unnoise_http_requests_total{route="/v1/jobs",status="202"}'] == 2
    assert values["unnoise_queue_depth"] == 3
    assert values['unnoise_batch_size_images_bucket{le="2"}'] == 0
    assert values['unnoise_batch_size_images_bucket{le="4"}'] == 1
    assert values['unnoise_step_seconds_bucket{le="+Inf"}'] == 1 and values["unnoise_step_seconds_sum"] == 100
    with pytest.raises(ValueError, match="labels"):
        Counter("c", "help", ("a",)).inc(b="x")
    histogram = Histogram("h", "help", (1.0,))
    histogram.observe(1.0)
    assert 'h_bucket{le="1"} 1' in histogram.render()


def test_key_check():
    check = KeyCheck(["alpha", "a-much-longer-key"])
    assert check.enabled and check("alpha") and check("a-much-longer-key")
    assert not check("alph") and not check("") and not check(None)
    assert not KeyCheck([]).enabled


def test_config_rejects_bad_values(monkeypatch):
    with pytest.raises(ValueError, match="max_batch=0"):
        ServeConfig(max_batch=0)
    with pytest.raises(ValueError, match="api_keys"):
        ServeConfig(api_keys=("",))
    monkeypatch.setenv("UNNOISE_API_KEYS", "k1, k2,")
    assert ServeConfig(api_keys=("k0",)).with_env_keys().api_keys == ("k0", "k1", "k2")


def test_a1111_sampler_names():
    from unnoise.serve.a1111 import A1111Txt2ImgRequest, a1111_values

    def values(**body):
        return a1111_values(A1111Txt2ImgRequest(**body))

    assert values(sampler_name="Euler a")["sampler"] == "euler_a"
    assert (values(sampler_name="DPM++ 2M Karras")["sampler"], values(sampler_name="DPM++ 2M Karras")["spacing"]) == (
        "dpmpp_2m", "karras")  # fmt: skip
    assert values(sampler_name="DPM++ 2M", scheduler="Exponential")["spacing"] == "exponential"
    assert values(sampler_name="heun", scheduler="Automatic")["spacing"] is None
    assert values(seed=-1)["seed"] is None and values(negative_prompt="")["negative_prompt"] is None
    with pytest.raises(ApiError, match="sampler_name='LMS'"):
        values(sampler_name="LMS")


def test_a1111_prompt_tags_are_the_requests_loras():
    """AUTOMATIC1111 clients name LoRAs by tags in the prompt: the pipeline reads them (its prompt language), the
    server only holds their weights to the jobs API's bounds."""
    from unnoise.serve.a1111 import A1111Txt2ImgRequest, a1111_values

    def values(prompt):
        return a1111_values(A1111Txt2ImgRequest(prompt=prompt))

    assert values("a cat")["prompt"] == "a cat"
    tagged = values("a cat <lora:ink:0.8>, ink style <lora:paper v2:-1>")
    assert tagged["prompt"] == "a cat <lora:ink:0.8>, ink style <lora:paper v2:-1>"
    assert tagged["prompt_syntax"] is True and "loras" not in tagged
    with pytest.raises(ApiError) as error:
        values("a cat <lora:ink:9>")
    assert error.value.param == "prompt" and error.value.message.startswith(
        "prompt='<lora:ink:9.0>' is not allowed; Input should be less than or equal to 4"
    )  # fmt: skip
    with pytest.raises(ApiError, match=r"^prompt='<lora:ink:nan>' is not allowed; Input should be a finite"):
        values("a cat <lora:ink:nan>")


def test_an_unknown_lora_is_a_400_and_a_spec_keeps_its_loras(pipe):
    with pytest.raises(ApiError) as error:
        build_spec(dict(prompt="x", loras={"ink": 1.0}), FIELDS_NATIVE, ServeConfig(), pipe)
    assert (error.value.status, error.value.param, error.value.code) == (400, "loras", "unknown_lora")
    assert error.value.message == (
        "loras={'ink': 1.0} is not allowed; 'ink' is not a known LoRA; available: none (load one with load_lora or "
        "set lora_dir)"
    )
    spec = build_spec(dict(prompt="x", loras={}), FIELDS_NATIVE, ServeConfig(), pipe)
    assert spec.loras == {} and spec.to_dict()["loras"] == {}


def test_serve_subcommand_flags(capsys, tmp_path):
    import argparse

    from unnoise.serve.cli import add_parser, config_from_args

    parser = argparse.ArgumentParser(prog="unnoise")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--max-batch", "4", "--api-key", "a", "--vram-budget", "2", "--timeout", "9",
                              "--lora-dir", "loras"])  # fmt: skip
    config = config_from_args(args)
    assert (config.max_batch, config.api_keys, config.vram_budget_gb, config.timeout_s) == (4, ("a",), 2.0, 9.0)
    assert config.lora_dir == Path("loras")
    with pytest.raises(SystemExit) as exit_info:
        args = parser.parse_args(["serve", "--max-batch", "0"])
        args.run(args)
    assert exit_info.value.code == 2 and "argument --max-batch: max_batch=0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # checked before the server starts, as the model folder
        args = parser.parse_args(["serve", "--lora-dir", str(tmp_path / "missing")])
        args.run(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(f"argument --lora-dir: {tmp_path / 'missing'} is not a folder\n")
