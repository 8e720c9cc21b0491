"""The local web page in a real browser: Debian's Chromium, headless, driven by Playwright, against ``serve`` on
loopback with the bundled demo model. Record captures Chromium's fake microphone (the demo sample played once), the
page resamples it to 16 kHz in an AudioWorklet and streams it over the WebSocket; the captions must equal the
streaming result for that clip. A dropped file is transcribed with its downloads offered.

Skipped, with the reason, where Chromium or Playwright is not installed (scripts/test installs both)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)

import mlx_canary  # noqa: E402
from mlx_canary.loading import DEMO_MODEL_DIR  # noqa: E402
from mlx_canary.scheduler import Scheduler  # noqa: E402
from mlx_canary.streaming_policy import StreamingOptions  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from server_load import ServerThread  # noqa: E402

SAMPLE = DEMO_MODEL_DIR / "sample.wav"
SCREENSHOT = os.environ.get("MLX_CANARY_SCREENSHOT")  # set to write the page's screenshot (docs/web-page.png)
BROWSER_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={SAMPLE}%noloop",
    "--autoplay-policy=no-user-gesture-required",
]


@pytest.fixture(scope="module")
def demo():
    return mlx_canary.load_model("demo")


@pytest.fixture(scope="module")
def page(demo, tmp_path_factory):
    worker = Scheduler(lambda: demo).start()
    with ServerThread(worker, model_id="demo") as server, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 720}, accept_downloads=True)
        tab = context.new_page()
        tab.goto(server.url + "/")
        tab.wait_for_function("document.getElementById('model').textContent.includes('en, de')", timeout=20_000)
        yield tab
        browser.close()
    worker.stop()


def test_live_captions_from_the_microphone(page, demo):
    page.click("#record")
    page.wait_for_function("document.getElementById('live-status').textContent === 'listening'", timeout=20_000)
    # the fake microphone plays the 3.5 s sample once, then silence; its words arrive while it plays
    page.wait_for_function("document.getElementById('captions').textContent.length > 0", timeout=20_000)
    page.wait_for_timeout(4_000)
    page.click("#stop")
    page.wait_for_function("document.getElementById('live-status').textContent === 'done'", timeout=30_000)
    captions = page.inner_text("#captions").strip()
    expected = demo.transcribe(str(SAMPLE), streaming=StreamingOptions(policy="alignatt", chunk_secs=1.0,
                                                                      right_context_secs=0.5))
    assert captions == expected.text == "Up big white house dog car."
    assert page.locator("#live-downloads a").count() == 1


def test_a_picked_file_is_transcribed_with_downloads(page, demo):
    page.set_input_files("#file", str(SAMPLE))
    page.wait_for_function("document.getElementById('file-text').textContent.length > 0", timeout=30_000)
    assert page.inner_text("#file-text").strip() == demo.transcribe(str(SAMPLE)).text
    links = page.locator("#downloads a")
    assert [links.nth(i).inner_text() for i in range(links.count())] == ["txt", "srt", "vtt", "json"]
    with page.expect_download() as download:
        links.nth(1).click()
    assert "Up big white house dog car." in Path(download.value.path()).read_text()
    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT)
