"""The web playground in a real browser: Debian's chromium, driven through selenium and the system
chromedriver, against a real `python -m service` process on a loopback port.

Every expectation about images, seeds and error messages is read from the API itself (httpx, same
server), so the page is checked to show exactly what the API returns.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from models import checkpoint
from models.config import preset
from models.consistency import ConsistencyModel
from tests.conftest import randomize, require_tool
from tests.integration.conftest import quick_server_env

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts"
API_KEY = "playground-e2e-key"
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
BIG_SEED = 9_223_372_036_854_770_000  # > 2^53: JavaScript numbers would round it
READY_TIMEOUT_S = 60.0
WAIT_S = 20.0  # longest wait for one thing to appear in the page
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",  # tests run as root in CI containers
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.wait import WebDriverWait
except ImportError:  # pragma: no cover - the skip below says what to install
    webdriver = None


# ---------------------------------------------------------------- the server


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(ckpt: Path, folder: Path, api_keys: str = "") -> Server:
    port = _free_port()
    env = quick_server_env(port, ckpt)
    if api_keys:
        env["CM_API_KEYS"] = api_keys
    log = folder / f"server-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return Server(f"http://127.0.0.1:{port}", proc, log)


def _wait_ready(server: Server) -> None:
    """Poll /readyz: a separate process offers no other event to wait on."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"python -m service exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    pytest.fail(f"python -m service was not ready within {READY_TIMEOUT_S} s:\n{server.log_tail()}")


def _stop_server(server: Server) -> None:
    server.proc.terminate()  # SIGTERM: the service drains and exits
    try:
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """One open server and one with CM_API_KEYS set, started together to share the warm-up time."""
    _require_browser()
    folder = tmp_path_factory.mktemp("playground")
    torch.manual_seed(0)
    cfg = preset("digits").replace(model_channels=16, num_groups=4)  # small: fast load and warm-up
    model = randomize(ConsistencyModel.from_config(cfg)).eval()
    ckpt = checkpoint.save(folder / "digits.safetensors", model, preset="digits", class_names=CLASS_NAMES)
    started = {"open": _start_server(ckpt, folder), "keyed": _start_server(ckpt, folder, api_keys=API_KEY)}
    try:
        for server in started.values():
            _wait_ready(server)
        yield started
    finally:
        for server in started.values():
            _stop_server(server)


def _api_generate(server: Server, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/v1/generate", json=body, headers=headers, timeout=30)


# ---------------------------------------------------------------- the browser


def _require_browser() -> None:
    require_tool("chromium", CHROMIUM)
    require_tool("chromedriver (Debian package chromium-driver)", CHROMEDRIVER)
    if webdriver is None:  # pinned in requirements-dev.txt, so only a hand-made venv lacks it
        message = "selenium is not installed in this venv (pip install -r requirements-dev.txt)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def browser(servers: dict[str, Server], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: WebDriver, what: str, condition: Callable[[WebDriver], Any]) -> Any:
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(condition)
    except Exception as e:  # a TimeoutException says nothing about the page: say what was awaited
        error = driver.execute_script("return document.getElementById('error').innerText")
        raise AssertionError(f"timed out waiting for {what}; error box: {error!r}") from e


def _open(driver: WebDriver, server: Server) -> None:
    driver.get(f"{server.url}/")
    _wait(driver, "the page script", lambda d: d.execute_script("return document.readyState") == "complete")


def _wait_models_loaded(driver: WebDriver) -> None:
    _wait(
        driver,
        "the model list",
        lambda d: d.execute_script(
            "return [...document.getElementById('model').options].some(o => o.value === 'digits')"
        ),
    )


def _set(driver: WebDriver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    if value:
        field.send_keys(value)


def _fill(driver: WebDriver, *, n: int, seed: str, steps: int | None = None, sigmas: str | None = None) -> None:
    _set(driver, "n", str(n))
    _set(driver, "seed", seed)
    mode = "sigmas" if sigmas is not None else "steps"
    driver.find_element(By.CSS_SELECTOR, f"label[for='mode-{mode}']").click()
    if sigmas is not None:
        _set(driver, "sigmas", sigmas)
    else:
        _set(driver, "steps", str(steps))


def _click_and_wait_done(driver: WebDriver, button_id: str) -> None:
    driver.find_element(By.ID, button_id).click()
    _wait(
        driver,
        f"the {button_id} request to finish",
        lambda d: d.execute_script("return !document.querySelector('.results').hasAttribute('aria-busy')"),
    )


def _decoded_tiles(driver: WebDriver, container: str, count: int) -> list[dict[str, Any]]:
    """Wait for `count` images in `container`, every one decoded; return what each tile shows."""
    script = """
        const tiles = [...document.querySelectorAll(arguments[0] + ' figure.tile')];
        if (tiles.length !== arguments[1]) return null;
        const imgs = tiles.map(t => t.querySelector('img'));
        if (!imgs.every(i => i.complete && i.naturalWidth > 0)) return null;
        return tiles.map((t, k) => ({
            seed: t.dataset.seed, seedText: t.querySelector('.seed').textContent,
            classText: t.querySelector('.cls').textContent, src: imgs[k].src,
            width: imgs[k].naturalWidth, height: imgs[k].naturalHeight}));
    """
    return _wait(driver, f"{count} decoded images in {container}", lambda d: d.execute_script(script, container, count))


def _error_box(driver: WebDriver) -> tuple[str, str]:
    """(whole box text, the message line) once the error box is visible."""
    _wait(driver, "the error box", lambda d: d.find_element(By.ID, "error").is_displayed())
    return (driver.find_element(By.ID, "error").text, driver.find_element(By.ID, "error-message").text)


def _js_errors(driver: WebDriver) -> list[str]:
    """Console errors other than the HTTP error statuses the tests provoke on purpose."""
    return [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]
    ]


def _data_url(image: dict[str, Any]) -> str:
    return f"data:{image['mime']};base64,{image['b64']}"


def _save_screenshot(driver: WebDriver, name: str) -> Path:
    """The whole page, not only the window (Chrome DevTools: captureBeyondViewport)."""
    width, height = driver.execute_script("const e = document.documentElement; return [e.scrollWidth, e.scrollHeight]")
    clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"captureBeyondViewport": True, "clip": clip})
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


# ---------------------------------------------------------------- the tests


def test_generate_shows_the_images_and_seeds_the_api_returned(servers: dict[str, Server], browser: WebDriver) -> None:
    server = servers["open"]
    _open(browser, server)
    _wait_models_loaded(browser)
    _fill(browser, n=4, seed="", steps=2)  # no seed: the server draws one and echoes it
    _click_and_wait_done(browser, "generate")
    tiles = _decoded_tiles(browser, "#grid", 4)

    base = int(tiles[0]["seed"])
    assert [t["seed"] for t in tiles] == [str(base + i) for i in range(4)]
    assert [t["seedText"] for t in tiles] == [t["seed"] for t in tiles]
    assert all((t["width"], t["height"]) == (8, 8) for t in tiles)  # the digits' 8x8 pixels, decoded

    expected = _api_generate(server, {"model": "digits", "n": 4, "seed": base, "steps": 2})
    assert expected.status_code == 200, expected.text
    images = expected.json()["images"]
    assert [t["seed"] for t in tiles] == [str(im["seed"]) for im in images]
    assert [t["src"] for t in tiles] == [_data_url(im) for im in images]  # same seed, same image
    for tile, im in zip(tiles, images, strict=True):
        assert tile["classText"] == CLASS_NAMES[im["class_label"]]

    timings = browser.find_element(By.ID, "timings").text
    for name in ("queue", "compute", "encode", "total"):
        assert name in timings
    assert str(base) in browser.find_element(By.ID, "run-info").text
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert _js_errors(browser) == []


def test_big_seeds_a_chosen_class_and_compare_steps(servers: dict[str, Server], browser: WebDriver) -> None:
    server = servers["open"]
    _open(browser, server)
    _wait_models_loaded(browser)
    _fill(browser, n=3, seed=str(BIG_SEED), steps=1)
    Select(browser.find_element(By.ID, "class-label")).select_by_visible_text("3 · three")
    _click_and_wait_done(browser, "generate")
    tiles = _decoded_tiles(browser, "#grid", 3)
    assert [t["seed"] for t in tiles] == [str(BIG_SEED + i) for i in range(3)]
    assert [t["classText"] for t in tiles] == ["three"] * 3

    _click_and_wait_done(browser, "compare")
    cells = _decoded_tiles(browser, "#compare-grid", 9)  # 3 seeds x (1, 2, 4 steps), row by row
    headers = browser.execute_script(
        "return [...document.querySelectorAll('#compare-grid thead th[data-steps]')].map(th => th.dataset.steps)"
    )
    assert headers == ["1", "2", "4"]
    rows = [cells[i : i + 3] for i in range(0, 9, 3)]
    for i, row in enumerate(rows):
        assert [c["seed"] for c in row] == [str(BIG_SEED + i)] * 3
    for col, steps in enumerate((1, 2, 4)):
        body = {"model": "digits", "n": 3, "seed": BIG_SEED, "steps": steps, "class_label": 3}
        resp = _api_generate(server, body)
        assert resp.status_code == 200, resp.text
        assert [row[col]["src"] for row in rows] == [_data_url(im) for im in resp.json()["images"]]
    assert [c["src"] for c in rows[0]] != [rows[0][0]["src"]] * 3  # more steps change the picture

    # enlarge one image: the dialog shows it and offers it for download
    browser.find_element(By.CSS_SELECTOR, "#grid figure.tile button.thumb").click()
    _wait(
        browser,
        "the enlarged image",
        lambda d: d.execute_script(
            "const i = document.getElementById('lightbox-img');"
            "return document.getElementById('lightbox').open && i.complete && i.naturalWidth > 0"
        ),
    )
    link = browser.find_element(By.ID, "lightbox-download")
    assert link.get_attribute("href") == tiles[0]["src"]
    assert link.get_attribute("download") == f"digits-seed{BIG_SEED}-class3.png"
    browser.find_element(By.ID, "lightbox-close").click()
    _wait(
        browser,
        "the dialog to close",
        lambda d: not d.execute_script("return document.getElementById('lightbox').open"),
    )
    assert _js_errors(browser) == []


def test_validation_error_shows_the_api_message(servers: dict[str, Server], browser: WebDriver) -> None:
    server = servers["open"]
    _open(browser, server)
    _wait_models_loaded(browser)
    _fill(browser, n=2, seed="7", sigmas="0.5, 2")  # not decreasing
    _click_and_wait_done(browser, "generate")
    text, message = _error_box(browser)

    expected = _api_generate(server, {"model": "digits", "n": 2, "seed": 7, "sigmas": [0.5, 2]})
    assert expected.status_code == 422
    error = expected.json()["error"]
    assert message == error["message"]
    assert "422" in text
    assert error["field"] is None or error["field"] in text
    assert browser.find_element(By.ID, "generate").is_enabled()  # the page stays usable
    assert _js_errors(browser) == []


def test_live_stats_and_screenshot(servers: dict[str, Server], browser: WebDriver) -> None:
    server = servers["open"]
    stats = httpx.get(f"{server.url}/v1/stats", timeout=10)
    assert stats.status_code == 200, stats.text
    _open(browser, server)
    _wait_models_loaded(browser)
    _wait(browser, "the stats panel", lambda d: d.find_element(By.ID, "stat-ready").text == "ready")
    for element_id in ("stat-rps", "stat-ips", "stat-queue", "stat-batch", "stat-inprog"):
        float(browser.find_element(By.ID, element_id).text)  # a number, not the "—" placeholder

    # the picture: a grid with its timings, a compare view, the stats panel
    _fill(browser, n=16, seed="2024", steps=2)
    _click_and_wait_done(browser, "generate")
    _decoded_tiles(browser, "#grid", 16)
    _fill(browser, n=4, seed="2024", steps=1)
    _click_and_wait_done(browser, "compare")
    _decoded_tiles(browser, "#compare-grid", 12)
    assert not browser.find_element(By.ID, "error").is_displayed()
    path = _save_screenshot(browser, "playground.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_api_key_from_the_page(servers: dict[str, Server], browser: WebDriver) -> None:
    server = servers["keyed"]
    _open(browser, server)  # another origin: an empty session storage
    _wait_models_loaded(browser)  # GET /v1/models needs no key
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == ""

    _fill(browser, n=2, seed="11", steps=1)
    _click_and_wait_done(browser, "generate")
    text, message = _error_box(browser)
    expected = _api_generate(server, {"model": "digits", "n": 2, "seed": 11, "steps": 1})
    assert expected.status_code == 401
    assert message == expected.json()["error"]["message"]
    assert "401" in text

    browser.find_element(By.ID, "api-key").send_keys(API_KEY, Keys.TAB)  # change event: reload the models
    _wait_models_loaded(browser)
    _click_and_wait_done(browser, "generate")
    tiles = _decoded_tiles(browser, "#grid", 2)
    assert [t["seed"] for t in tiles] == ["11", "12"]
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('cmserve.apiKey')") == API_KEY

    browser.refresh()  # the key survives a reload of the tab
    _wait_models_loaded(browser)
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == API_KEY
    _fill(browser, n=1, seed="5", steps=1)
    _click_and_wait_done(browser, "generate")
    (tile,) = _decoded_tiles(browser, "#grid", 1)
    expected = _api_generate(server, {"model": "digits", "n": 1, "seed": 5, "steps": 1}, key=API_KEY)
    assert tile["src"] == _data_url(expected.json()["images"][0])
    assert _js_errors(browser) == []


def test_edit_tab_inpaints_a_generated_image_and_interpolates(servers: dict[str, Server], browser: WebDriver) -> None:
    server = servers["open"]
    _open(browser, server)
    _wait_models_loaded(browser)
    _fill(browser, n=1, seed="21", steps=2)
    Select(browser.find_element(By.ID, "class-label")).select_by_visible_text("7 · seven")
    _click_and_wait_done(browser, "generate")
    (source,) = _decoded_tiles(browser, "#grid", 1)

    # the generated image goes to the Edit tab; its lower half is regenerated, as POST /v1/edit does with a box
    browser.find_element(By.CSS_SELECTOR, "#grid figure.tile button.thumb").click()
    _wait(browser, "the dialog", lambda d: d.execute_script("return document.getElementById('lightbox').open"))
    browser.find_element(By.ID, "lightbox-edit").click()
    _wait(browser, "the Edit tab", lambda d: d.find_element(By.ID, "edit-view").is_displayed())
    _wait(browser, "the image to edit", lambda d: "drawn at 8×8" in d.find_element(By.ID, "edit-source-info").text)
    browser.find_element(By.ID, "edit-lower-half").click()
    Select(browser.find_element(By.ID, "edit-task")).select_by_value("inpaint")
    _click_and_wait_done(browser, "edit-run")
    (edited,) = _decoded_tiles(browser, "#edit-grid", 1)
    body = {"model": "digits", "task": "inpaint", "image": source["src"].split(",", 1)[1], "box": [0, 4, 8, 8],
            "n": 1, "seed": 21, "steps": 2, "class_label": 7}
    expected = httpx.post(f"{server.url}/v1/edit", json=body, timeout=30)
    assert expected.status_code == 200, expected.text
    assert edited["src"] == _data_url(expected.json()["images"][0])

    # the interpolation strip: the images the API returns for the same seeds
    _set(browser, "interp-a", "3")
    _set(browser, "interp-b", "4")
    _set(browser, "interp-points", "5")
    _click_and_wait_done(browser, "interp-run")
    strip = _decoded_tiles(browser, "#interp-grid", 5)
    body = {"model": "digits", "interpolate": {"seeds": [3, 4], "points": 5}, "steps": 2, "class_label": 7}
    expected = _api_generate(server, body)
    assert expected.status_code == 200, expected.text
    assert [t["src"] for t in strip] == [_data_url(im) for im in expected.json()["images"]]
    assert [t["classText"] for t in strip] == ["α 0.00", "α 0.25", "α 0.50", "α 0.75", "α 1.00"]
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert _js_errors(browser) == []
