"""Builders shared by several test modules: random parameters and a tiny Stable Diffusion model (no hub)."""

import json
import socket
import string

import diffusers
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SIZE = 32  # pixels; VAE factor 4 and one U-Net downsampling make a latent factor of 8


def randomize(module: torch.nn.Module, seed: int, *, smooth: bool = False) -> None:
    """Redraw every parameter (no zero-init left to hide a bug): weights ~ N(0, 1/fan_in), norms ~ 1 +- 0.1.

    ``smooth``: every 3x3 kernel is a random channel mix times a normalized [1, 2, 1]^2 blur profile, gain 3.
    """
    g = torch.Generator().manual_seed(seed)
    blur = torch.tensor([1.0, 2.0, 1.0])
    blur = blur[:, None] * blur[None] / 16
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 4 and p.shape[-1] == 3 and smooth:
                p.copy_(torch.randn(*p.shape[:2], 1, 1, generator=g) / p.shape[1] ** 0.5 * blur * 3)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
SD_SCHEDULER = dict(SD_SCHEDULE, timestep_spacing="leading", steps_offset=1, clip_sample=False, set_alpha_to_one=False)


def tiny_tokenizer(folder) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single letters (no merges), written to ``folder``: no hub access."""
    tokens = [
        "<|startoftext|>",
        "<|endoftext|>",
        *string.ascii_lowercase,
        *(c + "</w>" for c in string.ascii_lowercase),
    ]
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def tiny_components(folder) -> dict:
    """Random tiny Stable Diffusion components as diffusers and transformers modules."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(folder)
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32,
    )  # fmt: skip
    text_encoder = CLIPTextModel(text).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4,
    ).eval()  # fmt: skip
    vae = diffusers.AutoencoderKL(
        block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8, latent_channels=4,
        sample_size=SIZE,
    ).eval()  # fmt: skip
    for i, module in enumerate((text_encoder, unet, vae)):
        randomize(module, seed=i + 1)
    return dict(text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, vae=vae)


def free_port() -> int:
    """A free TCP port on the loopback interface (for torchrun's rendezvous and test servers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(main, capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a command-line ``main`` called with ``argv`` (as strings)."""
    try:
        main([str(a) for a in argv])
        status = 0
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def decoded_latents(pipe, monkeypatch, prompt: str, **kwargs) -> torch.Tensor:
    """The latents ``pipe(prompt, **kwargs)`` decodes (its first ``decode`` call)."""
    seen = []
    decode = pipe.decode
    monkeypatch.setattr(pipe, "decode", lambda x: seen.append(x) or decode(x))
    pipe(prompt, **kwargs)
    monkeypatch.undo()
    return seen[0]


def captioned_images(folder, captions):
    """One 40x40 RGB image per caption with its ``.txt`` (unnoise.data.folder): random 4x4 colours upscaled
    bilinearly, smooth enough for a tiny autoencoder; the same images for the same captions."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, text in enumerate(captions):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((40, 40), Image.Resampling.BILINEAR).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(text)
    return folder
