"""The page at / (server/http_page.html) in a real headless Chromium, driven by Selenium,
against an in-process server with random weights at small sizes.

Debian's ``chromium`` and ``chromium-driver`` packages are the browser (.ci/run installs them
with apt-get; nothing is downloaded at run time); where they are missing the tests skip,
saying so. With ``GRAMSTYLE_SCREENSHOTS=FOLDER`` the first test saves the page at the start,
mid-run and at the end there (docs/images/ holds the ones made so).

Covers: choose a content and a style image, start, see a preview, then the final image at
the requested size, and download it (a PNG of that size); cancel a run and see the server's
worker freed; a corrupt image shows the server's message; with tokens, the page asks for one,
a missing token is refused and the right one works.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import build_server
from PIL import Image

from gramstyle.images import load_image, resize_long_side
from gramstyle.server.security import TokenStore
from gramstyle.server.serve import GramstyleServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed "
                                "(pip install 'gramstyle[test]')")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install "
                "chromium chromium-driver; .ci/run does)", allow_module_level=True)

from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

TOKEN = "page-test-token"
#: End to end, with a browser start-up: the slow set (CI runs it).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pictures(images, tmp_path_factory) -> dict[str, Path]:
    """Small PNG files to choose in the page, and a corrupt one."""
    folder = tmp_path_factory.mktemp("pictures")
    paths = {}
    for name in ("cat", "starry", "scream"):
        paths[name] = folder / f"{name}.png"
        resize_long_side(load_image(images[name]), 96).save(paths[name], "PNG")
    paths["corrupt"] = folder / "corrupt.png"
    paths["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    return paths


@pytest.fixture(scope="module")
def server(request) -> Iterator[GramstyleServer]:
    """Random weights; the trained VGG16 when making screenshots (a picture worth showing)."""
    engine = request.getfixturevalue(
        "hed_engine" if os.environ.get("GRAMSTYLE_SCREENSHOTS") else "random_engine")
    srv = build_server([engine], workers=1, queue_size=1, http_port=0).start()
    yield srv
    srv.stop(grace=None)


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1000,1100"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads), "download.prompt_for_download": False})
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except WebDriverException as exc:
        pytest.skip(f"chromium did not start under chromedriver: {exc.msg}")
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 60, what: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: condition(d), message=f"waited {timeout} s for {what}")


def element(driver, id_: str):
    return driver.find_element(By.ID, id_)


def fill(driver, pictures: dict[str, Path], content: str, styles: list[str], size: int,
         iterations: int) -> None:
    element(driver, "content").send_keys(str(pictures[content]))
    element(driver, "style").send_keys("\n".join(str(pictures[s]) for s in styles))
    for id_, value in (("size", size), ("iterations", iterations)):
        element(driver, id_).clear()
        element(driver, id_).send_keys(str(value))


def natural_size(driver) -> tuple[int, int]:
    return tuple(driver.execute_script(
        "const i = document.getElementById('image'); return [i.naturalWidth, i.naturalHeight];"))


def screenshot(driver, name: str) -> None:
    folder = os.environ.get("GRAMSTYLE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"http-page-{name}.png"))


def test_stylize_watch_and_download(browser, server, pictures, downloads):
    browser.get(f"http://127.0.0.1:{server.http_port}/")
    assert browser.title == "gramstyle"
    assert element(browser, "token-box").is_displayed() is False  # no tokens on this server
    fill(browser, pictures, "cat", ["starry", "scream"], size=80, iterations=40)
    screenshot(browser, "start")
    element(browser, "start").click()
    # A preview arrives (its iteration shown), then later ones change the image.
    wait(browser, lambda d: element(d, "image").get_attribute("data-state") == "preview",
         what="a preview")
    first = element(browser, "image").get_attribute("src")
    assert first.startswith("data:image/png;base64,")
    wait(browser, lambda d: element(d, "image").get_attribute("src") != first
         and element(d, "image").get_attribute("data-state") == "preview",
         what="a later preview")
    assert element(browser, "status").text.startswith("iteration ")
    screenshot(browser, "running")
    wait(browser, lambda d: element(d, "image").get_attribute("data-state") == "final",
         timeout=120, what="the final image")
    # The cat photo is 451x300: long side 80 -> 80x53.
    wait(browser, lambda d: natural_size(d) == (80, 53), what="the final image to decode")
    assert element(browser, "status").text == "done"
    assert element(browser, "caption").text.startswith("80x53, 40 iterations")
    assert element(browser, "error").text == ""
    screenshot(browser, "done")

    link = element(browser, "download")
    assert link.is_displayed()
    href = link.get_attribute("href")
    from_link = Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1])))
    assert from_link.format == "PNG" and from_link.size == (80, 53)
    link.click()  # and the browser saves it
    saved = downloads / "gramstyle.png"
    wait(browser, lambda _: saved.is_file() and saved.stat().st_size > 0, timeout=30,
         what="the download")
    with Image.open(saved) as image:
        assert image.size == (80, 53)
        image.load()


def test_cancel_frees_the_worker(browser, server, pictures):
    browser.get(f"http://127.0.0.1:{server.http_port}/")
    fill(browser, pictures, "cat", ["starry"], size=64, iterations=10_000)
    element(browser, "start").click()
    wait(browser, lambda d: element(d, "image").get_attribute("data-state") == "preview",
         what="a preview")
    assert server.work.busy == 1
    assert element(browser, "start").is_enabled() is False
    element(browser, "cancel").click()
    clicked = time.monotonic()
    wait(browser, lambda d: element(d, "status").text == "cancelled", what="'cancelled'")
    assert server.work.wait_idle(10), "the worker was not freed"
    assert time.monotonic() - clicked < 5, "freed long after the cancel"
    assert element(browser, "start").is_enabled()


def test_a_corrupt_image_shows_the_servers_message(browser, server, pictures):
    browser.get(f"http://127.0.0.1:{server.http_port}/")
    fill(browser, pictures, "cat", ["corrupt"], size=64, iterations=2)
    element(browser, "start").click()
    text = wait(browser, lambda d: element(d, "error").text, what="an error message")
    assert text.startswith("INVALID_ARGUMENT (HTTP 400): style[0]: "), text
    assert "\n  style[0]: " in text  # the field violation, listed
    assert element(browser, "status").text == "refused"


def test_tokens_are_asked_for(browser, random_engine, pictures, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    with build_server([random_engine], http_port=0, tokens=TokenStore(tokens)) as srv:
        browser.get(f"http://127.0.0.1:{srv.http_port}/")
        wait(browser, lambda d: element(d, "token-box").is_displayed(),
             what="the token field")
        fill(browser, pictures, "cat", ["starry"], size=48, iterations=2)
        element(browser, "start").click()
        text = wait(browser, lambda d: element(d, "error").text, what="the refusal")
        assert text == "UNAUTHENTICATED (HTTP 401): missing or invalid bearer token"
        element(browser, "token").send_keys(TOKEN)
        element(browser, "start").click()
        wait(browser, lambda d: element(d, "image").get_attribute("data-state") == "final",
             what="the final image")
        wait(browser, lambda d: natural_size(d) == (48, 32), what="the final image to decode")
        assert element(browser, "error").text == ""
        # Kept for this tab only: in sessionStorage, not localStorage.
        assert browser.execute_script("return sessionStorage.getItem('gramstyle-token')") \
            == TOKEN
        assert browser.execute_script("return localStorage.length") == 0
