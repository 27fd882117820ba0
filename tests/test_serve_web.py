"""The web page in headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by Selenium): type a
prompt, click generate, see the progress bar move and the image appear; cancel stops a long job; /docs renders
the API from files the server serves itself. Browser tests are skipped when Selenium, Chromium or its driver
is not installed."""

import io
import shutil

import pytest
import requests
from PIL import Image
from test_serve import thread_server, tiny_model, tiny_pipe  # noqa: F401 - fixtures

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

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
