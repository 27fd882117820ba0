"""A resolved request through ``request_to_bytes`` / ``request_from_bytes`` (how a job's inputs are stored for any
replica): every field back equal, the same images generated from it, and no pickle: a blob that is not the format
is refused with a message."""

import dataclasses
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from unnoise.pipeline import Pipeline, Request, resolve_request
from unnoise.pipeline.hires import Hires
from unnoise.pipeline.serialize import request_from_bytes, request_to_bytes


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("default")


def assert_same(a, b) -> None:
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), field.name
        elif field.name == "overlay" and x is not None:
            for name in ("original", "mask"):
                assert getattr(x, name).mode == getattr(y, name).mode
                assert np.array_equal(np.asarray(getattr(x, name)), np.asarray(getattr(y, name))), name
            assert (x.box, x.blend) == (y.box, y.blend)
        else:
            assert x == y and type(x) is type(y), field.name


def inpainting(pipe) -> Request:
    image = pipe("a handwritten 3", steps=2, seed=1)[0].convert("RGB")
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (8, 8, 20, 24))
    return Request("a handwritten 7", image=image, mask=mask, strength=0.7, steps=3, sampler="euler", seed=5,
                   inpaint_full_res=True, inpaint_full_res_padding=4, mask_blur=2, guidance_interval=(0.5, 10.0),
                   negative_prompt="blurry")  # fmt: skip


def hires(pipe) -> Request:
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float()
    return Request("a handwritten (two:1.2)", num_images=2, steps=3, seed=9, width=16, height=16, latents=latents,
                   hires=Hires(scale=2.0, upscaler="latent", steps=2, strength=0.6), cache_interval=2,
                   cache_range=(0.1, 5.0))  # fmt: skip


@pytest.mark.parametrize("make", [inpainting, hires])
def test_round_trip_keeps_every_field_and_the_images(pipe, make):
    resolved = resolve_request(pipe, make(pipe))
    data = request_to_bytes(resolved)
    back = request_from_bytes(data)
    assert_same(resolved, back)
    first, second = pipe.generate([resolved])[0], pipe.generate([back])[0]
    assert [np.asarray(i).tobytes() for i in first] == [np.asarray(i).tobytes() for i in second]


def test_fields_a_request_rarely_carries_come_back_with_their_types(pipe):
    resolved = dataclasses.replace(resolve_request(pipe, Request("a 1", steps=2, seed=0)), loras=(("ink", 0.5),),
                                   time_ids=(32.0, 32.0, 0.0, 0.0, 32.0, 32.0), negative_time_ids=(1.0, 2.0),
                                   guidance_scale=float("inf"))  # fmt: skip
    assert_same(resolved, request_from_bytes(request_to_bytes(resolved)))


def test_blobs_that_are_not_a_stored_request_are_refused(pipe):
    resolved = resolve_request(pipe, Request("a 1", steps=2, seed=0))
    with pytest.raises(ValueError, match="is not a safetensors blob"):
        request_from_bytes(pickle.dumps(resolved))
    from safetensors.torch import save

    with pytest.raises(ValueError, match=r"format=None; expected 'unnoise.resolved-request/1'"):
        request_from_bytes(save({"x": torch.zeros(1)}))


def test_an_overlay_image_of_another_mode_is_refused(pipe):
    resolved = resolve_request(pipe, inpainting(pipe))
    overlay = dataclasses.replace(resolved.overlay, mask=resolved.overlay.mask.convert("P"))
    with pytest.raises(ValueError, match=r"overlay.mask has mode 'P'; expected one of \('L', 'RGB', 'RGBA'\)"):
        request_to_bytes(dataclasses.replace(resolved, overlay=overlay))
