"""OpenAI Images API edits and variations through the unchanged ``openai`` client, against the library's img2img and
inpainting on the same tiny model: the image, the mask (alpha 0 -> white), the default strengths and the extensions
reach the pipeline as documented; bad images and masks get 400 naming the field."""

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image
from test_lora_serving import random_lora
from test_serve import ThreadServer, tiny_model, tiny_pipe  # noqa: F401 - fixtures

from unnoise.pipeline import Pipeline
from unnoise.serve import openai as serve_openai
from unnoise.serve.config import ServeConfig
from unnoise.serve.openai import EDIT_STRENGTH, MASKED_EDIT_STRENGTH, VARIATION_STRENGTH

openai = pytest.importorskip("openai")
# the client marks create_variation deprecated (OpenAI retired DALL-E 2); clients still call it
pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
SIZE = 32  # the tiny model's own size
STEPS = 10  # every tenth of strength starts at another step (int(steps * strength)): the defaults are told apart


@pytest.fixture(scope="module")
def server(tiny_pipe, tmp_path_factory):  # noqa: F811
    config = ServeConfig(model=tmp_path_factory.mktemp("openai") / "unused", db=tmp_path_factory.mktemp("db") / "j.db",
                         warmup=False, safety=False, max_batch=4)  # fmt: skip
    with ThreadServer(config, pipe=tiny_pipe) as running:
        yield running.base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def picture(size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    """A gray ramp with a bright square: structure for img2img to keep."""
    ramp = np.add.outer(np.arange(size[1]), np.arange(size[0])) * (200 / (size[0] + size[1]))
    ramp[8:20, 10:22] = 255
    return Image.fromarray(ramp.astype(np.uint8), "L")


def openai_mask(size: tuple[int, int] = (SIZE, SIZE), alpha: bool = True) -> Image.Image:
    """OpenAI's mask: the left half fully transparent (repaint), the rest opaque (keep)."""
    rgba = np.full((size[1], size[0], 4), 255, np.uint8)
    rgba[:, : size[0] // 2, 3] = 0
    return Image.fromarray(rgba, "RGBA") if alpha else Image.fromarray(rgba[..., :3], "RGB")


def library_mask() -> Image.Image:
    """The same mask as the pipeline takes it: white where it repaints."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, : SIZE // 2] = 255
    return Image.fromarray(mask, "L")


def decoded(result) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json))), np.float64) for item in result.data]


def assert_library_images(result, pipe, prompt: str, **settings) -> None:
    """The served images equal the library's for the same request (the one float rounding a batch allows)."""
    expected = [np.asarray(image, np.float64) for image in pipe(prompt, **settings)]
    served = decoded(result)
    assert len(served) == len(expected)
    for got, want in zip(served, expected, strict=True):
        assert np.abs(got - want).max() <= 1, np.abs(got - want).max()


# -- acceptance 2: edits and variations work ---------------------------------------------------------------------


def test_edit_with_a_mask_repaints_where_the_mask_is_transparent(client, tiny_pipe):  # noqa: F811
    result = client.images.edit(image=("in.png", png(picture()), "image/png"), mask=("m.png", png(openai_mask())),
                                prompt="a seven", n=2, response_format="b64_json",
                                extra_body={"seed": 11, "steps": STEPS})  # fmt: skip
    assert_library_images(result, tiny_pipe, "a seven", image=picture(), mask=library_mask(),
                          strength=MASKED_EDIT_STRENGTH, num_images=2, seed=11, steps=STEPS)  # fmt: skip


def test_edit_without_a_mask_is_img2img_of_the_whole_image(client, tiny_pipe):  # noqa: F811
    result = client.images.edit(image=("in.png", png(picture()), "image/png"), prompt="a three",
                                response_format="b64_json", extra_body={"seed": 3, "steps": STEPS})  # fmt: skip
    assert_library_images(result, tiny_pipe, "a three", image=picture(), strength=EDIT_STRENGTH, seed=3, steps=STEPS)
    # the openai client sends a list of images as image[]; the extension strength overrides the default
    extra = {"seed": 3, "steps": STEPS, "strength": 0.5}
    result = client.images.edit(image=[("in.png", png(picture()), "image/png")], prompt="a three",
                                response_format="b64_json", extra_body=extra)  # fmt: skip
    assert_library_images(result, tiny_pipe, "a three", image=picture(), strength=0.5, seed=3, steps=STEPS)


def test_variation_is_unconditional_img2img(client, tiny_pipe):  # noqa: F811
    result = client.images.create_variation(image=("in.png", png(picture()), "image/png"), n=2, size="32x32",
                                            response_format="b64_json", model="dall-e-2", user="someone",
                                            extra_body={"seed": 5, "steps": STEPS})  # fmt: skip
    assert_library_images(result, tiny_pipe, "", image=picture(), strength=VARIATION_STRENGTH, num_images=2, seed=5,
                          steps=STEPS)  # fmt: skip
    result = client.images.create_variation(image=("in.png", png(picture()), "image/png"), response_format="b64_json",
                                            extra_body={"seed": 5, "prompt": "a one", "strength": 0.75})  # fmt: skip
    assert_library_images(result, tiny_pipe, "a one", image=picture(), strength=0.75, seed=5)


def test_size_resizes_the_image_and_url_serves_the_png(client, server, tiny_pipe):  # noqa: F811
    """A 64x64 image and mask edited at size 32x32 (the pipeline resizes both), answered with a URL, as by default."""
    big = picture((64, 64))
    result = client.images.edit(image=("in.png", png(big)), mask=("m.png", png(openai_mask((64, 64)))), prompt="a two",
                                size="32x32", extra_body={"seed": 9, "strength": 0.75})  # fmt: skip
    url = result.data[0].url
    assert url.startswith(server) and result.data[0].b64_json is None
    served = np.asarray(Image.open(io.BytesIO(requests.get(url, timeout=30).content)), np.float64)
    big_mask = library_mask().resize((64, 64), Image.Resampling.NEAREST)
    [want] = tiny_pipe("a two", image=big, mask=big_mask, strength=0.75, seed=9, width=32, height=32)
    assert served.shape == (32, 32) and np.abs(served - np.asarray(want, np.float64)).max() <= 1
    # without a size (or with "auto") the output has the image's size (the tiny model declares no sizes)
    for size in ({}, {"size": "auto"}):
        result = client.images.create_variation(image=("in.png", png(big)), response_format="b64_json",
                                                extra_body={"seed": 9, "steps": 2, **size})  # fmt: skip
        assert decoded(result)[0].shape == (64, 64)
        assert_library_images(result, tiny_pipe, "", image=big, strength=VARIATION_STRENGTH, seed=9, steps=2)


# -- acceptance 2: bad input ---------------------------------------------------------------------------------------


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


GOOD = ("in.png", png(picture()), "image/png")
OPAQUE = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 255))
# (keyword arguments of images.edit, or of images.create_variation when "prompt" is absent; the field the 400 names)
BAD_FILES = [
    ({"image": [], "prompt": "x"}, "image"),
    ({"image": []}, "image"),
    ({"image": ("in.jpg", jpeg(picture()), "image/jpeg"), "prompt": "x"}, "image"),
    ({"image": ("in.jpg", jpeg(picture()), "image/jpeg")}, "image"),
    ({"image": ("in.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image/png"), "prompt": "x"}, "image"),
    ({"image": [GOOD, GOOD], "prompt": "x"}, "image"),
    ({"image": GOOD, "mask": ("m.png", png(openai_mask((16, 16)))), "prompt": "x"}, "mask"),
    ({"image": GOOD, "mask": ("m.jpg", jpeg(picture())), "prompt": "x"}, "mask"),
    ({"image": GOOD, "mask": ("m.png", png(openai_mask(alpha=False))), "prompt": "x"}, "mask"),
    ({"image": GOOD, "mask": ("m.png", png(OPAQUE)), "prompt": "x"}, "mask"),
]
BAD_IDS = ["edit-none", "variation-none", "edit-jpeg", "variation-jpeg", "edit-broken", "edit-two", "mask-size",
           "mask-jpeg", "mask-no-alpha", "mask-opaque"]  # fmt: skip


@pytest.mark.parametrize("kwargs, field", BAD_FILES, ids=BAD_IDS)
def test_bad_images_get_400_naming_the_field(client, kwargs, field):
    call = client.images.edit if "prompt" in kwargs else client.images.create_variation
    with pytest.raises(openai.BadRequestError) as error:
        call(**kwargs)
    body = error.value.body
    assert body["param"] == field and body["message"].startswith(field) and body["code"] == "invalid_image", body


def test_uploads_over_the_limits_get_400(client, monkeypatch):
    """The byte and pixel limits (50 MB and 4096x4096, lowered here: the server runs in this process)."""
    monkeypatch.setattr(serve_openai, "MAX_UPLOAD_BYTES", len(GOOD[1]) - 1)
    with pytest.raises(openai.BadRequestError, match=f"at most {len(GOOD[1]) - 1} bytes") as error:
        client.images.create_variation(image=GOOD)
    assert error.value.body["param"] == "image"
    monkeypatch.undo()
    monkeypatch.setattr(serve_openai, "MAX_INPUT_PIXELS", SIZE * SIZE - 1)
    with pytest.raises(openai.BadRequestError, match=f"it is {SIZE}x{SIZE}, more than") as error:
        client.images.edit(image=GOOD, mask=("m.png", png(openai_mask())), prompt="x")
    assert error.value.body["param"] == "image"


def test_an_image_sent_as_text_gets_400_naming_it(server):
    response = requests.post(f"{server}/v1/images/edits", data={"prompt": "x", "image": "in.png"}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "image"


def test_a_json_body_gets_415_naming_multipart(server):
    for path in ("edits", "variations"):
        response = requests.post(f"{server}/v1/images/{path}", json={"prompt": "x", "image": "in.png"}, timeout=30)
        assert response.status_code == 415 and "multipart/form-data" in response.json()["error"]["message"]


# values the generations refuse are refused here with the same 422 naming the field
BAD_VALUES = [
    ({"n": "0"}, "n"),
    ({"n": "5"}, "n"),
    ({"size": "33x32"}, "size"),
    ({"size": "big"}, "size"),
    ({"response_format": "gif"}, "response_format"),
    ({"steps": "0"}, "steps"),
    ({"sampler": "lms"}, "sampler"),
    ({"strength": "0"}, "strength"),
    ({"strength": "1.5"}, "strength"),
    ({"strength": "0.1", "steps": "4"}, "strength"),  # int(4 * 0.1) = 0 steps: the pipeline refuses it
    ({"loras[ink]": "9"}, "loras.ink"),
    ({"loras": "{}"}, "loras"),
    ({"stream": "true"}, "stream"),
]


@pytest.mark.parametrize("path", ["edits", "variations"])
@pytest.mark.parametrize("form, field", BAD_VALUES, ids=[f for _, f in BAD_VALUES])
def test_bad_values_get_the_generations_422(server, path, form, field):
    files = {"image": ("in.png", png(picture()), "image/png")}
    response = requests.post(f"{server}/v1/images/{path}", data={"prompt": "x", **form}, files=files, timeout=30)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["message"].startswith(field), error


def test_a_lora_the_server_does_not_have_is_a_400_naming_loras(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.images.create_variation(image=GOOD, extra_body={"loras": {"nope": 0.5}})
    assert error.value.body["param"] == "loras" and error.value.body["code"] == "unknown_lora"


def test_loras_as_form_fields_are_the_library_adapters(tiny_model, tmp_path):  # noqa: F811
    """``extra_body={"loras": {...}}`` reaches the multipart form as ``loras[NAME]`` and runs that adapter."""
    random_lora(Pipeline.from_pretrained(tiny_model), tmp_path / "ink.safetensors", seed=0)
    config = ServeConfig(model=tmp_path / "unused", db=tmp_path / "jobs.db", warmup=False, safety=False,
                         lora_dir=tmp_path)  # fmt: skip
    with ThreadServer(config, pipe=Pipeline.from_pretrained(tiny_model)) as running:
        client = openai.OpenAI(base_url=f"{running.base}/v1", api_key="unused", max_retries=0)
        result = client.images.create_variation(image=GOOD, response_format="b64_json",
                                                extra_body={"seed": 2, "loras": {"ink": 0.5}})  # fmt: skip
    library = Pipeline.from_pretrained(tiny_model)
    library.lora_dir = tmp_path
    assert_library_images(result, library, "", image=picture(), strength=VARIATION_STRENGTH, seed=2,
                          loras={"ink": 0.5})  # fmt: skip
    without = library("", image=picture(), strength=VARIATION_STRENGTH, seed=2)[0]
    assert np.abs(decoded(result)[0] - np.asarray(without, np.float64)).max() > 8  # the adapter changed the image
