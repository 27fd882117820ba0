"""The web page in headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by Selenium): type a
prompt, click generate, see the progress bar move and the image appear; cancel stops a long job; the sampler, size
and LoRA choices come from the server; the img2img / inpainting mode uploads an image, paints a mask and gets the
library's image for what it sent; /docs renders the API from files the server serves itself. The jobs API's image
fields, which the page sends, are tested here too. Browser tests are skipped when Selenium, Chromium or its driver
is not installed."""

import base64
import dataclasses
import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image, ImageFilter
from test_lora_serving import random_lora
from test_serve import ThreadServer, post, thread_server, tiny_model, tiny_pipe, wait_job  # noqa: F401 - fixtures

from unnoise.core.samplers import SAMPLERS
from unnoise.core.schedules import SPACINGS
from unnoise.pipeline import Pipeline
from unnoise.serve.config import ServeConfig
from unnoise.serve.validation import image_digest

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "outputs" / "test-artifacts"  # git-ignored; screenshots a person can look at after a run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

# Records every value the progress bar takes (the test cannot poll fast enough to see each step): each mutation's
# old value, then the value after the batch of mutations that one callback reports.
WATCH_PROGRESS = """
window.seen = [];
const bar = document.getElementById("progress");
new MutationObserver((records) => {
  for (const record of records) window.seen.push(Number(record.oldValue));
  window.seen.push(Number(bar.value));
}).observe(bar, {attributes: true, attributeFilter: ["value"], attributeOldValue: true});
"""


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("chromium and chromedriver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-extensions", "--no-first-run",
                 "--disable-sync", "--window-size=1000,900"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def fill(browser, **fields):
    for name, value in fields.items():
        element = browser.find_element(By.ID, name)
        element.clear()
        element.send_keys(str(value))


def test_generate_shows_progress_then_the_image(browser, thread_server):  # noqa: F811
    with thread_server(warmup=True) as server:
        browser.get(server.base + "/")
        WebDriverWait(browser, 20).until(lambda b: "model" in b.find_element(By.ID, "model").text)
        browser.execute_script(WATCH_PROGRESS)
        fill(browser, prompt="a handwritten seven", steps=60, seed=1234, guidance=2.5)
        browser.find_element(By.ID, "generate").click()
        image = WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#images img"))[0]
        WebDriverWait(browser, 10).until(lambda b: b.execute_script("return arguments[0].naturalWidth", image) > 0)
        seen = browser.execute_script("return window.seen")
        assert len([v for v in seen if 0 < v < 60]) >= 3 and max(seen) == 60, seen  # it moved, then filled
        assert browser.execute_script("return arguments[0].naturalWidth", image) == 32
        caption = browser.find_element(By.CSS_SELECTOR, "#images figcaption").text
        assert "a handwritten seven" in caption and "Seed: 1234" in caption and "Steps: 60" in caption
        assert browser.find_element(By.ID, "status").text.startswith("done")


def test_cancel_button_stops_the_job(browser, thread_server):  # noqa: F811
    with thread_server() as server:
        browser.get(server.base + "/")
        WebDriverWait(browser, 20).until(lambda b: "model" in b.find_element(By.ID, "model").text)
        fill(browser, prompt="a long one", steps=1000)
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "status").text.startswith("step"))
        browser.find_element(By.ID, "cancel").click()
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "status").text.startswith("cancelled"))
        assert browser.find_elements(By.CSS_SELECTOR, "#images img") == []
        assert browser.find_element(By.ID, "generate").is_enabled()


# Every resource the page loaded: none may come from another host (a CDN is a blank page without internet).
LOADED = "return performance.getEntriesByType('resource').map((entry) => entry.name)"
OPERATIONS = ["/v1/images/generations", "/v1/jobs", "/v1/jobs/{job_id}/events", "/sdapi/v1/txt2img"]


def test_docs_render_the_operations_from_local_files(browser, thread_server):  # noqa: F811
    with thread_server() as server:
        browser.get(server.base + "/docs")
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
        paths = {e.get_attribute("data-path") for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        assert set(OPERATIONS) <= paths, paths
        loaded = browser.execute_script(LOADED)
        assert server.base + "/docs/assets/swagger-ui-bundle.js" in loaded
        assert all(url.startswith(server.base + "/") for url in loaded), loaded


def test_the_page_has_a_favicon(thread_server):  # noqa: F811
    with thread_server() as server:
        page = requests.get(server.base + "/", timeout=10).text
        icon = requests.get(server.base + "/favicon.ico", timeout=10)
        assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/"), icon.headers
        assert Image.open(io.BytesIO(icon.content)).format == "ICO"
        assert '<link rel="icon" href="/favicon.ico">' in page


# -- sampler, size, LoRAs and img2img / inpainting ---------------------------------------------------------------------

SIZES = ((32, 32), (64, 32))  # what the page's model declares: its size select offers these and nothing else

# Keeps the body of every request the page POSTs (what it built from the form), then sends it.
RECORD_POSTS = """
window.sent = [];
const send = window.fetch;
window.fetch = (url, init) => {
  if (init && init.method === "POST") window.sent.push(JSON.parse(init.body));
  return send(url, init);
};
"""


@pytest.fixture(scope="module")
def web_lora_dir(tiny_model, tmp_path_factory) -> Path:  # noqa: F811
    folder = tmp_path_factory.mktemp("web-loras")
    pipe = Pipeline.from_pretrained(tiny_model)
    random_lora(pipe, folder / "ink.safetensors", seed=0)
    random_lora(pipe, folder / "spare.safetensors", seed=1)
    return folder


@pytest.fixture(scope="module")
def oracle(tiny_model, web_lora_dir) -> Pipeline:  # noqa: F811
    """The library, on a pipeline of its own: what the served image must equal."""
    pipe = Pipeline.from_pretrained(tiny_model)
    pipe.lora_dir = web_lora_dir
    return pipe


@pytest.fixture
def web_server(tiny_model, web_lora_dir, tmp_path):  # noqa: F811
    """Factory: the tiny model declaring ``SIZES``, ``--lora-dir`` with ink and spare, in a thread."""

    def make(**fields) -> ThreadServer:
        loaded = Pipeline.from_pretrained(tiny_model)  # its own: LoRAs load into its modules
        pipe = Pipeline(loaded.unet, loaded.vae, loaded.text_encoder, dataclasses.replace(loaded.config, sizes=SIZES))
        config = ServeConfig(model=Path("unused"), db=tmp_path / "jobs.sqlite3", warmup=False, safety=False,
                             max_steps=1000, lora_dir=web_lora_dir, **fields)  # fmt: skip
        return ThreadServer(config, pipe=pipe)

    return make


def open_page(browser, base: str) -> None:
    browser.get(base + "/")
    WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#sampler option"))
    WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#loras input.lora"))
    browser.execute_script(RECORD_POSTS)


def options(browser, select: str) -> list[str]:
    return [o.get_attribute("value") for o in Select(browser.find_element(By.ID, select)).options]


def finished_image(browser, count: int = 1):
    """The newest image shown, once there are ``count``."""
    image = WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#images img")[count - 1 :])[0]
    WebDriverWait(browser, 10).until(lambda b: b.execute_script("return arguments[0].naturalWidth", image) > 0)
    assert browser.find_element(By.ID, "status").text.startswith("done"), browser.find_element(By.ID, "status").text
    return image


def served(base: str) -> tuple[dict, np.ndarray]:
    """The newest job and its first image's pixels."""
    job = requests.get(f"{base}/v1/jobs", params={"limit": 1}, timeout=10).json()["data"][0]
    return job, np.asarray(Image.open(io.BytesIO(requests.get(job["images"][0]["url"], timeout=10).content)))


def decoded(text: str) -> Image.Image:
    """A data URL's image, as the page sends it."""
    assert text.startswith("data:image/png;base64,"), text[:40]
    image = Image.open(io.BytesIO(base64.b64decode(text.split(",", 1)[1])))
    image.load()
    return image


def library(pipe: Pipeline, body: dict) -> np.ndarray:
    """The library's image for a jobs API body."""
    settings = {k: decoded(v) if k in ("image", "mask") else v for k, v in body.items() if k not in ("prompt", "n")}
    return np.asarray(pipe(body["prompt"], num_images=body["n"], **settings)[0])


def test_sampler_size_and_loras_come_from_the_server(browser, web_server, oracle):
    """GET /v1/model states the model's sizes, samplers and defaults; the selects list the samplers (the model's
    default chosen) and the declared sizes only; the LoRAs are GET /v1/loras'; what is picked is sent and gives the
    library's image."""
    with web_server() as server:
        config, ready = server.app.state.config, requests.get(f"{server.base}/ready", timeout=10).json()
        sampling = oracle.config.sampling
        assert requests.get(f"{server.base}/v1/model", timeout=10).json() == {
            "id": ready["model"], "hash": ready["model_hash"], "sizes": [[32, 32], [64, 32]], "default_size": [32, 32],
            "any_size": False, "latent_factor": 4, "samplers": list(SAMPLERS), "spacings": list(SPACINGS),
            "defaults": {"sampler": sampling.sampler, "spacing": sampling.spacing, "steps": 4, "guidance_scale": 2.0},
            "limits": {"max_batch": config.max_batch, "max_steps": 1000, "max_pixels": config.max_pixels,
                       "guidance_range": list(config.guidance_range)},
        }  # fmt: skip
        open_page(browser, server.base)
        assert options(browser, "sampler") == list(SAMPLERS)
        assert (
            Select(browser.find_element(By.ID, "sampler")).first_selected_option.text == oracle.config.sampling.sampler
        )
        assert options(browser, "size") == ["32x32", "64x32"]  # no "other size": the server refuses those
        assert Select(browser.find_element(By.ID, "size")).first_selected_option.get_attribute("value") == "32x32"
        names = [e.get_attribute("value") for e in browser.find_elements(By.CSS_SELECTOR, "#loras input.lora")]
        assert names == [lora["name"] for lora in requests.get(f"{server.base}/v1/loras", timeout=10).json()["data"]]
        assert names == ["ink", "spare"]
        Select(browser.find_element(By.ID, "sampler")).select_by_value("euler_a")
        Select(browser.find_element(By.ID, "size")).select_by_value("64x32")
        browser.find_element(By.CSS_SELECTOR, "#loras input.lora[value=ink]").click()
        fill(browser, prompt="a (handwritten:1.2) seven", steps=4, seed=5)
        weight = browser.find_element(By.CSS_SELECTOR, "input.lora-weight[data-lora=ink]")
        weight.clear()
        weight.send_keys("0.5")
        browser.find_element(By.ID, "generate").click()
        image = finished_image(browser)
        [body] = browser.execute_script("return window.sent")
        assert body == {"prompt": "a (handwritten:1.2) seven", "n": 1, "sampler": "euler_a", "steps": 4, "seed": 5,
                        "width": 64, "height": 32, "loras": {"ink": 0.5}}  # fmt: skip
        assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == [
            64,
            32,
        ]
        caption = browser.find_element(By.CSS_SELECTOR, "#images figcaption").text
        assert "<lora:ink:0.5>" in caption and "Size: 64x32" in caption and "Sampler: Euler a" in caption, caption
        job, pixels = served(server.base)
        assert job["request"]["loras"] == {"ink": 0.5}
        assert np.array_equal(pixels, library(oracle, body))


def test_other_sizes_are_offered_when_the_server_serves_them(browser, web_server, thread_server):  # noqa: F811
    """--any-size adds "other size" (width and height in steps of the latent factor); a model without declared
    sizes has only that, its own size filled in."""
    with web_server(any_size=True) as server:
        open_page(browser, server.base)
        assert options(browser, "size") == ["32x32", "64x32", "custom"]
        assert not browser.find_element(By.ID, "width").is_displayed()
        Select(browser.find_element(By.ID, "size")).select_by_value("custom")
        assert browser.find_element(By.ID, "width").is_displayed()
        assert browser.find_element(By.ID, "width").get_attribute("step") == "4"  # the tiny VAE's factor
        fill(browser, prompt="wide", width=48, height=16, steps=2)
        browser.find_element(By.ID, "generate").click()
        image = finished_image(browser)
        assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == [
            48,
            16,
        ]
    with thread_server() as server:  # the tiny model declares no sizes
        browser.get(server.base + "/")
        WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#size option"))
        assert options(browser, "size") == ["custom"]
        assert browser.find_element(By.ID, "width").get_attribute("value") == "32"
        assert browser.find_element(By.ID, "loras").text.startswith("none")


# The painted mask as the page would send it: (width, height, grey levels row by row) or null when nothing is painted.
READ_MASK = """
const url = maskPNG();
if (url === null) return null;
const img = new Image();
img.src = url;
await img.decode();
const canvas = document.createElement("canvas");
[canvas.width, canvas.height] = [img.width, img.height];
canvas.getContext("2d").drawImage(img, 0, 0);
const data = canvas.getContext("2d").getImageData(0, 0, img.width, img.height).data;
return [img.width, img.height, Array.from(data.filter((_, i) => i % 4 === 0))];
"""


def painted_mask(browser) -> np.ndarray | None:
    found = browser.execute_script(READ_MASK)
    return None if found is None else np.array(found[2], dtype=np.uint8).reshape(found[1], found[0])


def stroke(browser, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Drag the mouse over the mask from ``start`` to ``end``, in image pixels."""
    canvas = browser.find_element(By.ID, "mask")
    scale = canvas.size["width"] / int(canvas.get_attribute("width"))
    width, height = int(canvas.get_attribute("width")), int(canvas.get_attribute("height"))
    x0, y0 = ((start[0] - width / 2) * scale, (start[1] - height / 2) * scale)  # offsets from the element's centre
    dx, dy = (end[0] - start[0]) * scale, (end[1] - start[1]) * scale
    ActionChains(browser).move_to_element_with_offset(canvas, round(x0), round(y0)).click_and_hold().move_by_offset(
        round(dx), round(dy)).release().perform()  # fmt: skip


def test_inpainting_mode_paints_a_mask_and_gets_the_library_image(browser, web_server, oracle, tmp_path):
    """Acceptance: upload an image (the size select follows it), paint a mask (erase, clear and invert work on it),
    set strength, mask blur, masked content, inpaint area and sampler, generate: the page sends the image and a
    white-on-black mask of its size, and shows the library's inpainting of them, the pixels away from the mask the
    input's; with nothing painted it is img2img. The screenshot lands in this test's pytest tmp folder
    (``inpainting.png``) and in ``outputs/test-artifacts/web-inpainting.png`` (git-ignored)."""
    ramp = np.add.outer(np.arange(32) * 4, np.arange(32) * 3).astype(np.uint8)  # a gradient, grey as RGB
    Image.fromarray(np.stack([ramp] * 3, axis=-1)).save(tmp_path / "input.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with web_server() as server:
        open_page(browser, server.base)
        assert not browser.find_element(By.ID, "image-file").is_displayed()
        Select(browser.find_element(By.ID, "mode")).select_by_value("img2img")
        fill(browser, prompt="a handwritten eight", steps=8, seed=11)
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 10).until(lambda b: "choose an image" in b.find_element(By.ID, "status").text)
        browser.find_element(By.ID, "image-file").send_keys(str(tmp_path / "notes.txt"))
        WebDriverWait(browser, 10).until(lambda b: "notes.txt is not an image" in b.find_element(By.ID, "status").text)
        assert not browser.find_element(By.ID, "editor").is_displayed()
        Select(browser.find_element(By.ID, "size")).select_by_value("64x32")
        browser.find_element(By.ID, "image-file").send_keys(str(tmp_path / "input.png"))
        WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "editor").is_displayed())
        assert Select(browser.find_element(By.ID, "size")).first_selected_option.get_attribute("value") == "32x32"
        assert browser.find_element(By.ID, "brush").get_attribute("value") == "4"  # an eighth of the side
        assert painted_mask(browser) is None
        stroke(browser, (8, 16), (24, 16))
        first = painted_mask(browser)
        assert first.shape == (32, 32) and first[15:17, 8:24].min() == 255, first  # the brush's path is white
        assert first[:12].max() == 0 and first[20:].max() == 0 and first[:, :4].max() == 0, first  # nothing else
        browser.find_element(By.ID, "mask-invert").click()
        assert np.array_equal(painted_mask(browser), 255 - first)
        browser.find_element(By.ID, "mask-invert").click()
        assert np.array_equal(painted_mask(browser), first)
        browser.find_element(By.ID, "erase").click()
        browser.find_element(By.ID, "brush").send_keys(*["\ue014"] * 8)  # arrow right: a wider brush to erase with
        stroke(browser, (8, 16), (24, 16))
        assert painted_mask(browser) is None  # erased
        browser.find_element(By.ID, "erase").click()
        stroke(browser, (4, 4), (4, 28))
        browser.find_element(By.ID, "mask-clear").click()
        assert painted_mask(browser) is None
        browser.execute_script("const s = document.getElementById('strength'); s.value = 0.9;"
                               "s.dispatchEvent(new Event('input'))")  # fmt: skip
        assert browser.find_element(By.ID, "strength-value").text == "0.9"
        browser.find_element(By.ID, "generate").click()  # nothing painted: img2img
        finished_image(browser)
        [img2img] = browser.execute_script("return window.sent")
        assert {k: v for k, v in img2img.items() if k != "image"} == {
            "prompt": "a handwritten eight", "n": 1, "sampler": "euler", "steps": 8, "seed": 11, "width": 32,
            "height": 32, "strength": 0.9, "resize_mode": "resize",
        }  # fmt: skip
        assert np.array_equal(served(server.base)[1], library(oracle, img2img))

        browser.execute_script("document.getElementById('brush').value = 6")
        stroke(browser, (6, 10), (26, 22))  # a diagonal: the mask sent
        mask = painted_mask(browser)
        Select(browser.find_element(By.ID, "sampler")).select_by_value("ddim")
        Select(browser.find_element(By.ID, "inpainting-fill")).select_by_value("latent_noise")
        browser.find_element(By.ID, "inpaint-full-res").click()
        fill(browser, **{"mask-blur": 1.5, "inpaint-padding": 8})
        browser.find_element(By.ID, "generate").click()
        finished_image(browser, count=2)
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1000, height + 140)  # the whole page: the painted mask and the images made
        browser.save_screenshot(str(tmp_path / "inpainting.png"))
        browser.set_window_size(1000, 900)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "inpainting.png", ARTIFACTS / "web-inpainting.png")
        body = browser.execute_script("return window.sent")[1]
        sent_image, sent_mask = decoded(body["image"]), decoded(body["mask"])
        assert np.array_equal(np.asarray(sent_image.convert("RGB")), np.stack([ramp] * 3, axis=-1))  # as uploaded
        assert np.array_equal(np.asarray(sent_mask.convert("L")), mask) and sent_mask.size == sent_image.size
        assert {k: v for k, v in body.items() if k not in ("image", "mask")} == {
            **{k: v for k, v in img2img.items() if k != "image"}, "sampler": "ddim", "mask_blur": 1.5,
            "inpainting_fill": "latent_noise", "inpaint_full_res": True, "inpaint_full_res_padding": 8,
        }  # fmt: skip
        job, pixels = served(server.base)
        assert job["request"]["image"] == image_digest(sent_image) and job["request"]["mask_blur"] == 1.5
        assert np.array_equal(pixels, library(oracle, body))
        far = np.asarray(Image.fromarray(mask).filter(ImageFilter.MaxFilter(9))) == 0  # the blur (1.5: 4 px) misses
        assert far.sum() > 100 and np.array_equal(pixels[far], ramp[far])
        assert not np.array_equal(pixels[~far], ramp[~far])
    assert (ARTIFACTS / "web-inpainting.png").stat().st_size > 0


# -- the jobs API's image fields (what the page sends) -----------------------------------------------------------------


def png_base64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_jobs_take_plain_base64_images_and_give_the_library_image(web_server, oracle, tmp_path):
    """Plain base64 (no data: prefix) works as the page's data URLs; the resize mode, mask inversion and paste-back
    reach the pipeline: each served image is the library's for the same fields, and the stored request records the
    images by digest."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 32), dtype=np.uint8))  # 32 wide, 40 high: resized to 32x32
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (0, 0, 32, 20))
    base = {"prompt": "a four", "n": 1, "steps": 6, "seed": 2, "width": 32, "height": 32}
    bodies = [
        {**base, "image": image, "strength": 0.5, "resize_mode": "crop"},
        {**base, "image": image, "mask": mask, "mask_invert": True, "paste_back": False, "resize_mode": "fill",
         "inpainting_fill": "original", "mask_blur": 0},
    ]  # fmt: skip
    with web_server() as server:
        for body in bodies:
            sent = {k: png_base64(v) if isinstance(v, Image.Image) else v for k, v in body.items()}
            job = wait_job(server.base, post(server.base, "/v1/jobs", sent).json()["id"])
            assert job["status"] == "succeeded", job
            assert job["request"]["image"] == image_digest(image)
            assert job["request"]["mask"] == (image_digest(mask) if "mask" in body else None)
            assert job["request"]["resize_mode"] == body["resize_mode"]
            png = requests.get(job["images"][0]["url"], timeout=10).content
            settings = {k: v for k, v in body.items() if k not in ("prompt", "n")}
            expected = np.asarray(oracle(body["prompt"], **settings)[0])
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), expected)


def claims_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height``: refused before its pixels are decoded."""
    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, format="PNG")
    data = bytearray(out.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's fields, after the signature, length and type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


TEXT = base64.b64encode(b"just text").decode()
BAD_IMAGES = [
    ({"image": "not base64!"}, "image", "it is not valid base64"),
    ({"image": TEXT}, "image", "it is not a readable image"),
    ({"image": "data:image/png;base64," + TEXT}, "image", "it is not a readable image"),
    ({"image": "https://example.com/a.png"}, "image", "this server does not fetch URLs"),
    ({"image": "HUGE"}, "image", "'4097x4097 image' is not allowed; at most 16777216 pixels"),
    ({"image": "IMAGE", "mask": TEXT}, "mask", "it is not a readable image"),
    ({"mask": "IMAGE"}, "mask", "a mask needs an image"),
    ({"image": "IMAGE", "mask": "SMALL"}, "mask", "its size 16x16 differs from the image's 32x32"),
    ({"image": "IMAGE", "strength": 0}, "strength", "Input should be greater than 0"),
    ({"image": "IMAGE", "resize_mode": "stretch"}, "resize_mode", "allowed: resize, crop, fill, latent"),
    ({"image": "IMAGE", "mask": "IMAGE", "inpainting_fill": "blur"}, "inpainting_fill", "allowed: fill, original"),
    ({"image": "IMAGE", "mask_blur": -1}, "mask_blur", "Input should be greater than or equal to 0"),
    ({"image": "IMAGE", "mask_blur": 2}, "mask_blur", "a mask"),  # a mask setting without a mask
    ({"image": "IMAGE", "imagee": 1}, "imagee", "Extra inputs are not permitted"),
]


@pytest.fixture(scope="module")
def api_server(tiny_model, tmp_path_factory):  # noqa: F811
    config = ServeConfig(model=Path("unused"), db=tmp_path_factory.mktemp("web-api") / "jobs.sqlite3", warmup=False,
                         safety=False)  # fmt: skip
    with ThreadServer(config, pipe=Pipeline.from_pretrained(tiny_model)) as server:
        yield server.base


@pytest.mark.parametrize("fields, param, why", BAD_IMAGES, ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(BAD_IMAGES)])
def test_bad_job_images_get_422_naming_the_field(api_server, fields, param, why):
    images = {"IMAGE": png_base64(Image.new("L", (32, 32), 128)), "SMALL": png_base64(Image.new("L", (16, 16), 255)),
              "HUGE": base64.b64encode(claims_size(4097, 4097)).decode()}  # fmt: skip
    body = {"prompt": "x", "steps": 2, **{k: images.get(v, v) for k, v in fields.items()}}
    response = post(api_server, "/v1/jobs", body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(param) and why in error["message"], error
