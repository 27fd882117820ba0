"""AUTOMATIC1111's prompt language (unnoise.pipeline.prompts): emphasis and editing against AUTOMATIC1111's published
doctests, token windows, weighted encoding against plain references, and the pipeline's use of it (schedules
through a recording U-Net, LoRA tags, PNG parameters and --from-png, the switch to plain prompts)."""

import json
import string

import diffusers
import numpy as np
import pytest
import torch
from helpers import SD_SCHEDULE, run_cli, tiny_components
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from unnoise import cli
from unnoise.core.samplers import sample
from unnoise.models.lora import LoRAAdapter, save_lora
from unnoise.models.text import CLIPTextEncoder, DualCLIPTextEncoder, MiniLMEncoder
from unnoise.pipeline import Pipeline, Request
from unnoise.pipeline.png import parse_parameters, read_png_parameters, save_png
from unnoise.pipeline.prompts import (
    StepConditioned,
    encode_prompts,
    extract_loras,
    parse_attention,
    prompt_schedule,
    step_of_sigma,
    text_at_step,
    token_windows,
)

SIZE = 32

# -- emphasis --------------------------------------------------------------------------------------------------------

# The first six are the doctests of AUTOMATIC1111's parse_prompt_attention (modules/prompt_parser.py, v1.10); the rest
# follow the same function's rules (unclosed brackets weigh the rest, closers without an opener are text, escapes,
# "BREAK" split out of text only) and were checked against it.
ATTENTION = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),  # fmt: skip
    ("((a))", [("a", 1.1 * 1.1)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("x [unbalanced", [("x ", 1.0), ("unbalanced", 1 / 1.1)]),
    ("a) b] c", [("a) b] c", 1.0)]),
    ("(a:1.5 )", [("a", 1.5)]),
    ("(a : -0.5)", [("a ", -0.5)]),
    ("a :1.2) b", [("a :1.2) b", 1.0)]),
    ("\\\\ \\[x\\)", [("\\ [x)", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
    ("", [("", 1.0)]),
    ("(a)(b:1.1)", [("ab", 1.1)]),
]


@pytest.mark.parametrize(("text", "expected"), ATTENTION)
def test_emphasis_parses_as_automatic1111(text, expected):
    assert parse_attention(text) == expected


def test_a_weight_that_is_no_number_is_refused():
    with pytest.raises(
        ValueError, match=r"prompt='x \(a:1\.2\.3\)' is not allowed; its weight '1\.2\.3' is not a number"
    ):
        parse_attention("x (a:1.2.3)")


# -- prompt editing and alternation ------------------------------------------------------------------------------------

# AUTOMATIC1111's doctests of get_learned_conditioning_prompt_schedules (modules/prompt_parser.py, v1.10), 10 steps,
# but its "a [{b|d{:.5] c" (which it marks "not handling this right now": its own grammar no longer parses it so);
# the last ones follow its grammar ("|" outside brackets, numbers without a point) and were checked against it.
SCHEDULES = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)]),
    ("[fe|]male", [(i, "female" if i % 2 else "male") for i in range(1, 11)]),
    ("[fe|||]male", [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)]),
    ("a | b [c:2]", [(10, "a | b [c:2]")]),
    ("a [b:1.0] c", [(10, "a  c")]),
    ("a [b:0] c", [(10, "a b c")]),
    ("[a:b:c]", [(10, "[a:b:c]")]),
    ("[a:3 b:4]", [(4, "a"), (10, "3 b")]),
]


@pytest.mark.parametrize(("prompt", "expected"), SCHEDULES)
def test_schedules_as_automatic1111(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_step_texts_follow_automatic1111s_counter():
    """AUTOMATIC1111 counts steps from 0 and takes the first entry with ``step <= end``."""
    edit = prompt_schedule("a [b:3]", 10)
    assert [text_at_step(edit, i) for i in range(10)] == ["a "] * 4 + ["a b"] * 6
    alternation = prompt_schedule("[x|y]", 6)
    assert [text_at_step(alternation, i) for i in range(6)] == ["x", "x", "y", "x", "y", "x"]


# -- LoRA tags ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "text", "loras"),
    [
        ("a cat <lora:ink:0.5>", "a cat ", {"ink": 0.5}),
        ("<lora:ink>a <lora:b_2:-1.5> cat", "a  cat", {"ink": 1.0, "b_2": -1.5}),
        ("a <lora:ink:0.7:0.7>", "a ", {"ink": 0.7}),
        ("no tags (here)", "no tags (here)", {}),
    ],
)
def test_lora_tags_are_taken_out(prompt, text, loras):
    assert extract_loras(prompt) == (text, loras)


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ("a <hypernet:x:1>", r"prompt: <hypernet:x:1> is not supported: hypernetworks are not available"),
        ("a <lyco:x:1>", r"extra networks of kind 'lyco' are not available"),
        ("<lora:x:0.5:1>", r"<lora:x:0.5:1> gives the text encoder and the U-Net different weights"),
        ("<lora:x:big>", r"<lora:x:big> has a weight that is not a number"),
        ("<lora:x:1> <lora:x:1>", r"the LoRA 'x' is tagged twice"),
        ("<lora:x:te=1>", r"<lora:x:te=1> is not a LoRA tag"),
    ],
)
def test_bad_tags_are_refused(prompt, match):
    with pytest.raises(ValueError, match=match):
        extract_loras(prompt)


# -- token windows and encoding ----------------------------------------------------------------------------------------


def letters_tokenizer(folder, max_length: int, pad: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single letters and some punctuation (no merges): one token per character."""
    chars = [*string.ascii_lowercase, ",", "!", "("]
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length, pad_token=pad
    )


def clip_model(tokenizer, width: int, *, projection: bool = False, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, bos_token_id=0, eos_token_id=1,
        pad_token_id=tokenizer.pad_token_id, projection_dim=24, hidden_act="gelu",
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny CLIP text encoder with SD's 77-token windows (75 content tokens)."""
    tokenizer = letters_tokenizer(tmp_path_factory.mktemp("clip77"), 77)
    return CLIPTextEncoder(clip_model(tokenizer, 32), tokenizer)


@pytest.fixture(scope="module")
def short_tokenizer(tmp_path_factory):
    return letters_tokenizer(tmp_path_factory.mktemp("clip16"), 16)  # windows of 14 content tokens


@pytest.fixture(scope="module")
def minilm():
    return MiniLMEncoder.from_package()


def ids(tokenizer, *tokens: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(list(tokens))


def test_windows_cut_after_a_near_comma_and_at_break(short_tokenizer):
    t = short_tokenizer
    head = ids(t, *"abcdefghi", "j</w>", ",</w>")  # 11 tokens, the comma last
    tail = ids(t, *"klmnop", "q</w>")
    text = "abcdefghij, klmnopq"
    assert [w[0] for w in token_windows(t, text, 14)] == [head, tail]  # cut moved back to the comma
    assert [w[0] for w in token_windows(t, text, 14, comma_backtrack=0)] == [(head + tail)[:14], (head + tail)[14:]]
    assert [w[0] for w in token_windows(t, text, 14, comma_backtrack=2)] == [(head + tail)[:14], (head + tail)[14:]]
    assert [w[0] for w in token_windows(t, "ab BREAK cd", 14)] == [ids(t, "a", "b</w>"), ids(t, "c", "d</w>")]
    assert [w[0] for w in token_windows(t, "BREAK ab", 14)] == [[], ids(t, "a", "b</w>")]
    assert token_windows(t, "", 14) == [([], [])]
    [(tokens, weights)] = token_windows(t, "ab (cd:1.5) [e]", 14)
    assert tokens == ids(t, "a", "b</w>", "c", "d</w>", "e</w>")
    assert weights == [1.0, 1.0, 1.5, 1.5, 1 / 1.1]


def test_a_200_token_prompt_encodes_into_3_windows(clip):
    words = ["".join(string.ascii_lowercase[(i + j) % 26] for j in range(5)) for i in range(40)]  # 5 tokens each
    out = encode_prompts(clip, [" ".join(words)])
    assert out.hidden_states.shape == (1, 3 * 77, 32) and out.attention_mask.shape == (1, 3 * 77)
    # unweighted windows of 15, 15 and 10 words are those words' plain encodings, bit for bit
    for k, part in enumerate((words[:15], words[15:30], words[30:])):
        plain = clip.encode([" ".join(part)])
        assert torch.equal(out.hidden_states[0, k * 77 : (k + 1) * 77], plain.hidden_states[0])
        assert torch.equal(out.attention_mask[0, k * 77 : (k + 1) * 77], plain.attention_mask[0])
    assert torch.equal(out.pooled[0], clip.encode([" ".join(words[:15])]).pooled[0])  # the first window's


def test_prompts_of_a_batch_get_the_same_number_of_windows(clip):
    long, short = "abcde " * 20, "ab"
    out = encode_prompts(clip, [long, short])
    empty = clip.encode([""]).hidden_states[0]
    assert out.hidden_states.shape[1] == 2 * 77
    assert torch.equal(out.hidden_states[1, :77], clip.encode([short]).hidden_states[0])
    assert torch.equal(out.hidden_states[1, 77:], empty)


def tiny_dual(tmp_path_factory) -> DualCLIPTextEncoder:
    first = letters_tokenizer(tmp_path_factory.mktemp("first"), 16)
    second = letters_tokenizer(tmp_path_factory.mktemp("second"), 16, pad="!")  # as bigG: a padding token of its own
    return DualCLIPTextEncoder(
        CLIPTextEncoder(clip_model(first, 32, seed=1), first, penultimate=True),
        CLIPTextEncoder(clip_model(second, 48, projection=True, seed=2), second, penultimate=True),
    )


@pytest.fixture(scope="module")
def encoders(clip, short_tokenizer, minilm, tmp_path_factory):
    model = clip_model(short_tokenizer, 32, seed=3)
    return {
        "clip": clip,
        "clip_skip": CLIPTextEncoder(model, short_tokenizer, clip_skip=1),
        "penultimate": CLIPTextEncoder(model, short_tokenizer, penultimate=True),
        "sdxl": tiny_dual(tmp_path_factory),
        "minilm": minilm,
    }


@pytest.mark.parametrize("name", ["clip", "clip_skip", "penultimate", "sdxl", "minilm"])
@pytest.mark.parametrize("prompt", ["ab cd", "(ab cd:1.0)", "ab\\\\ cd"])
def test_weights_of_one_give_the_plain_encoding_bit_for_bit(encoders, name, prompt):
    """``(ab cd:1.0)`` and ``ab\\\\ cd`` (an escape) take the windowed path; ``ab cd`` the plain one."""
    encoder = encoders[name]
    ours, plain = encode_prompts(encoder, [prompt]), encoder.encode(["ab cd" if "\\" not in prompt else "ab\\ cd"])
    assert torch.equal(ours.hidden_states, plain.hidden_states)
    assert torch.equal(ours.pooled, plain.pooled)
    assert torch.equal(ours.attention_mask, plain.attention_mask)


def emphasized(hidden: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """AUTOMATIC1111's emphasis on one window, written out: ``z = h * w; z * mean(h) / mean(z)``."""
    z = hidden * torch.tensor(weights)[:, None]
    return z * (hidden.mean() / z.mean())


def test_weighted_clip_windows_match_a_plain_reference(encoders, short_tokenizer):
    encoder, t = encoders["clip_skip"], short_tokenizer
    prompt = "(abcdefghijklmn:1.2) opq [rs]"  # a full first window (14 tokens), then "opq rs"
    out = encode_prompts(encoder, [prompt])
    first = ids(t, *"abcdefghijklm", "n</w>")
    second = ids(t, "o", "p", "q</w>", "r", "s</w>")
    rows = [[0, *first, 1], [0, *second, 1] + [t.pad_token_id] * 9]
    weights = [[1.0] + [1.2] * 14 + [1.0], [1.0] * 4 + [1 / 1.1] * 2 + [1.0] * 10]
    result = encoder.model(input_ids=torch.tensor(rows), output_hidden_states=True)
    hidden = encoder.model.final_layer_norm(result.hidden_states[-2])  # clip_skip=1 (transformers 5 layout)
    expected = torch.cat([emphasized(hidden[0], weights[0]), emphasized(hidden[1], weights[1])])
    torch.testing.assert_close(out.hidden_states[0], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(out.pooled[0], result.pooler_output[0])  # pooled: the first window's, unweighted


def test_weighted_minilm_matches_a_plain_reference(minilm):
    prompt = "a (red:1.4) cat BREAK [on a mat]"
    out = encode_prompts(minilm, [prompt])
    t, model = minilm.tokenizer, minilm.model
    pieces = [("a ", 1.0), ("red", 1.4), (" cat", 1.0), ("on a mat", 1 / 1.1)]
    content = [(t(p, add_special_tokens=False)["input_ids"], w) for p, w in pieces]
    windows = [content[:3], content[3:]]
    hidden, masks = [], []
    for window in windows:
        tokens = [i for piece, _ in window for i in piece]
        weights = [w for piece, w in window for _ in piece]
        fill = 77 - len(tokens) - 2
        row = torch.tensor([[t.cls_token_id, *tokens, t.sep_token_id] + [t.pad_token_id] * fill])
        mask = torch.tensor([[1] * (len(tokens) + 2) + [0] * fill])
        h = model(input_ids=row, attention_mask=mask).last_hidden_state[0]
        hidden.append((h, emphasized(h, [1.0, *weights, 1.0] + [1.0] * fill)))
        masks.append(mask[0])
    torch.testing.assert_close(out.hidden_states[0], torch.cat([z for _, z in hidden]), rtol=1e-6, atol=1e-6)
    real = torch.cat(masks).bool()
    mean = torch.cat([h for h, _ in hidden])[real].mean(0)  # the sentence embedding over both windows, unweighted
    torch.testing.assert_close(out.pooled[0], mean / mean.norm(), rtol=1e-5, atol=1e-6)


# -- conditioning that follows the step --------------------------------------------------------------------------------


def test_step_of_sigma_takes_the_interval_that_holds_it():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 0.0])
    assert [step_of_sigma(sigmas, s) for s in (10.0, 7.0, 5.0, 3.0, 2.0, 1.0, 0.0)] == [0, 0, 1, 1, 2, 2, 2]
    assert step_of_sigma(sigmas, torch.tensor([5.0, 5.0])) == 1


def test_step_conditioned_gives_second_order_evaluations_their_steps():
    """Heun evaluates at every grid sigma and again at the next one; each call gets its interval's segment."""
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0])
    seen = []

    def denoiser(x, sigma, tag):
        seen.append((float(torch.as_tensor(sigma).max()), int(tag)))
        return x * 0.5

    conds = [{"tag": torch.tensor(k)} for k in range(3)]
    wrapped = StepConditioned(denoiser, sigmas, [0, 1, 1, 2], conds)
    sample(wrapped, torch.ones(1, 1, 2, 2), sigmas, "heun")
    expected = {8.0: 0, 4.0: 1, 2.0: 1, 1.0: 2}
    assert seen and all(tag == expected[s] for s, tag in seen)
    assert {s for s, _ in seen} == set(expected)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """The tiny SD model's folder (letters tokenizer, 16 tokens) and a LoRA file ``ink`` in a folder of its own."""
    model = diffusers.StableDiffusionPipeline(
        **tiny_components(tmp_path_factory.mktemp("tokenizer")),
        scheduler=diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading", steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    pipe = Pipeline.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    networks = {"unet": pipe.unet, "text_encoder": pipe.text_encoder.lora_root()}
    adapter = LoRAAdapter.create(networks, rank=2, alpha=2, generator=g)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.up.normal_(0, 0.5, generator=g)
    ink = save_lora(adapter, tmp_path_factory.mktemp("loras") / "ink.safetensors")
    return {"folder": folder, "ink": ink}


@pytest.fixture(scope="module")
def pipe(sd):
    pipe = Pipeline.from_pretrained(sd["folder"])
    pipe.lora_dir = sd["ink"].parent
    return pipe


@pytest.fixture
def recorded(pipe, monkeypatch):
    """The U-Net's text conditioning at every call, in order."""
    calls = []
    forward = pipe.unet.forward

    def recording(x, t, encoder_hidden_states, **kwargs):
        calls.append(encoder_hidden_states.clone())
        return forward(x, t, encoder_hidden_states=encoder_hidden_states, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", recording)
    return calls


def plain(pipe, text: str) -> torch.Tensor:
    return pipe.text_encoder.encode([text]).hidden_states[0]


def close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to float rounding: the pipeline encodes its texts in one batch, the reference one at a time."""
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_prompt_editing_switches_conditioning_at_the_right_step(pipe, recorded):
    """6 Euler steps: ``[cd:ef:0.5]`` ends "cd" at step int(0.5 * 6) = 3 (steps 0-3), the negative alternates from
    step 1 on, and a request batched alongside keeps its plain prompt throughout."""
    settings = dict(steps=6, sampler="euler", guidance_scale=5.0, width=SIZE, height=SIZE)
    edited = Request("ab [cd:ef:0.5]", negative_prompt="[xy|zw]", seed=1, **settings)
    other = Request("gh", negative_prompt="ij", seed=2, **settings)
    pipe.generate([edited, other])
    assert len(recorded) == 6
    positives = ["ab cd"] * 4 + ["ab ef"] * 2
    negatives = ["xy", "xy", "zw", "xy", "zw", "xy"]
    for call, positive, negative in zip(recorded, positives, negatives, strict=True):
        assert close(call[0], plain(pipe, positive))  # batch: [cond edited, cond other, uncond ..., ...]
        assert close(call[1], plain(pipe, "gh"))
        assert close(call[2], plain(pipe, negative))
        assert close(call[3], plain(pipe, "ij"))


def test_the_negative_prompt_is_padded_to_the_prompts_windows(pipe, recorded):
    pipe(("abcdefg " * 3).strip(), negative_prompt="xy", steps=1, seed=0, guidance_scale=3.0)
    [call] = recorded
    assert call.shape[1] == 2 * 16  # 21 tokens: two windows of 14
    assert close(call[1, :16], plain(pipe, "xy")) and close(call[1, 16:], plain(pipe, ""))


def test_plain_prompts_pass_brackets_through(pipe, recorded):
    pipe("(ab) [cd]", steps=1, seed=0, prompt_syntax=False)
    assert close(recorded[-1][0], plain(pipe, "(ab) [cd]"))
    pipe("(ab) [cd]", steps=1, seed=0)
    assert close(recorded[-1][0], encode_prompts(pipe.text_encoder, ["(ab) [cd]"]).hidden_states[0])
    assert not torch.equal(recorded[-1][0], recorded[-2][0])
    pipe.prompt_syntax = False
    try:
        pipe("<lora:ink>", steps=1, seed=0)  # a tag is text too: nothing loaded
        assert close(recorded[-1][0], plain(pipe, "<lora:ink>"))
    finally:
        pipe.prompt_syntax = True


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_a_lora_tag_is_the_library_lora_and_its_png_reproduces_it(sd, pipe, tmp_path, capsys):
    settings = dict(steps=3, seed=5, width=SIZE, height=SIZE)
    [tagged] = pipe("ab <lora:ink:0.5> cd", **settings)
    [requested] = pipe("ab cd", loras={"ink": 0.5}, **settings)
    library = Pipeline.from_pretrained(sd["folder"])
    library.load_lora(sd["ink"], 0.5)
    [loaded] = library("ab cd", **settings)
    [base] = pipe("ab cd", **settings)
    assert np.array_equal(pixels(tagged), pixels(requested)) and np.array_equal(pixels(tagged), pixels(loaded))
    assert not np.array_equal(pixels(tagged), pixels(base))
    parameters = tagged.info["parameters"]
    assert parameters.startswith("ab <lora:ink:0.5> cd\n")  # the prompt as written, the tag once
    assert parse_parameters(parameters)["loras"] == {"ink": 0.5}
    save_png(tagged, tmp_path / "tagged.png")
    argv = ["generate", "--model", sd["folder"], "-o", tmp_path / "out", "--device", "cpu", "--no-safety"]
    status, out, err = run_cli(
        cli.main, capsys, *argv, "--from-png", tmp_path / "tagged.png", "--lora-dir", sd["ink"].parent
    )
    assert status == 0, err
    [again] = out.split()
    assert np.array_equal(pixels(Image.open(again)), pixels(tagged))
    assert read_png_parameters(again)["loras"] == {"ink": 0.5}


def test_cli_plain_prompts_flag(sd, pipe, tmp_path, capsys):
    argv = ["generate", "(ab)", "--model", sd["folder"], "-o", tmp_path, "--device", "cpu", "--no-safety"]
    argv += ["--steps", 1, "--seed", 3]
    outputs = []
    for extra in ([], ["--plain-prompts"]):
        status, out, err = run_cli(cli.main, capsys, *argv, *extra)
        assert status == 0, err
        outputs.append(pixels(Image.open(out.split()[0])))
    assert np.array_equal(outputs[0], pixels(pipe("(ab)", steps=1, seed=3)[0]))
    assert np.array_equal(outputs[1], pixels(pipe("(ab)", steps=1, seed=3, prompt_syntax=False)[0]))
    assert not np.array_equal(outputs[0], outputs[1])


def test_a_plain_prompt_is_recorded_and_replayed_as_plain_text(sd, pipe, tmp_path, capsys):
    """With the language off, the PNG parameters say so, and --from-png keeps brackets and tags as text."""
    prompt = "(ab:1.5) <lora:ink:0.5>"
    argv = ["generate", prompt, "--model", sd["folder"], "-o", tmp_path, "--device", "cpu", "--no-safety"]
    status, out, err = run_cli(cli.main, capsys, *argv, "--steps", 1, "--seed", 4, "--plain-prompts")
    assert status == 0, err
    [first] = out.split()
    params = read_png_parameters(first)
    assert (params["prompt"], params["prompt_syntax"], "loras" not in params) == (prompt, False, True)
    assert "Prompt syntax: off" in Image.open(first).info["parameters"]
    expected = pixels(pipe(prompt, steps=1, seed=4, prompt_syntax=False)[0])
    assert np.array_equal(pixels(Image.open(first)), expected)
    replay = ["generate", "--model", sd["folder"], "-o", tmp_path / "again", "--device", "cpu", "--no-safety"]
    status, out, err = run_cli(cli.main, capsys, *replay, "--from-png", first)
    assert status == 0, err
    assert np.array_equal(pixels(Image.open(out.split()[0])), expected)
    on = pipe("(ab:1.5)", steps=1, seed=4)[0].info["parameters"]
    assert "Prompt syntax" not in on  # on is the default: not written


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (dict(prompt="ab <lora:nope:1>"), r"prompt='ab <lora:nope:1>' is not allowed; its tag names 'nope', not a "),
        (dict(prompt="ab <lora:ink:1>", loras={"ink": 0.5}), r"loras=.*'ink' is also tagged in the prompt"),
        (dict(prompt="ab", negative_prompt="<lora:ink:1>"), r"negative_prompt=.*LoRA tags are read from the prompt"),
        (dict(prompt="ab <hypernet:x:1>"), r"hypernetworks are not available"),
        (dict(prompt="ab", prompt_syntax="yes"), r"prompt_syntax='yes' is not allowed; expected True, False or None"),
    ],
)
def test_request_errors_name_the_field(pipe, settings, match):
    with pytest.raises(ValueError, match=match):
        pipe(settings.pop("prompt"), steps=1, **settings)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A tiny SDXL base (two text towers, pooled embedding, time ids; zeros for an empty negative prompt)."""
    parts = tiny_components(tmp_path_factory.mktemp("xl_tokenizer"))  # its tokenizer and VAE
    tokenizer, vae = parts["tokenizer"], parts["vae"]
    first, second = clip_model(tokenizer, 32, seed=4), clip_model(tokenizer, 48, projection=True, seed=5)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=80, attention_head_dim=4, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 6 * 8,
    ).eval()  # fmt: skip
    xl = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=first, tokenizer=tokenizer, text_encoder_2=second, tokenizer_2=tokenizer, unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading", steps_offset=1),
        add_watermarker=False,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("xl")
    xl.save_pretrained(folder)
    return Pipeline.from_pretrained(folder)


def test_sdxl_edits_switch_hidden_states_and_pooled_embedding(sdxl, monkeypatch):
    calls = []
    forward = sdxl.unet.forward

    def recording(x, t, encoder_hidden_states, **kwargs):
        calls.append((encoder_hidden_states.clone(), kwargs["text_embeds"].clone()))
        return forward(x, t, encoder_hidden_states=encoder_hidden_states, **kwargs)

    monkeypatch.setattr(sdxl.unet, "forward", recording)
    long = "abcdefg " * 2  # two windows of 14 with the edit's longer text
    sdxl(f"{long}[hij:klmnop:2]", steps=4, sampler="euler", seed=0, guidance_scale=4.0, width=SIZE, height=SIZE)
    assert len(calls) == 4
    for step, (hidden, pooled) in enumerate(calls):
        text = f"{long}hij" if step <= 2 else f"{long}klmnop"
        expected = encode_prompts(sdxl.text_encoder, [text])
        assert hidden.shape[1] == 2 * 16
        # the pipeline encodes both texts in one batch: equal up to the rounding of another batch size
        torch.testing.assert_close(hidden[0], expected.hidden_states[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pooled[0], expected.pooled[0], rtol=1e-5, atol=1e-6)
        assert not hidden[1].any() and not pooled[1].any()  # SDXL base: zeros for the empty negative, both windows


def test_plain_prompts_take_the_path_they_took_before(pipe):
    """A prompt without syntax that fits one window gives the same image with the language on and off."""
    settings = dict(steps=2, seed=4, negative_prompt="xy", guidance_scale=3.0)
    [on] = pipe("ab cd", **settings)
    [off] = pipe("ab cd", prompt_syntax=False, **settings)
    assert np.array_equal(pixels(on), pixels(off))
