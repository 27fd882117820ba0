"""The web page in headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by Selenium): type a
prompt, click generate, see the progress bar move and the image appear; cancel stops a long job. Skipped when
Selenium, Chromium or its driver is not installed."""

import shutil

import pytest
from test_serve import thread_server, tiny_model, tiny_pipe  # noqa: F401 - fixtures

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium and chromedriver are not installed")

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
