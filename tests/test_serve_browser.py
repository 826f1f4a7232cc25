"""The live page in a real headless Chromium: its fake microphone plays a recording through getUserMedia,
the AudioWorklet and WS /stream; the detection the page shows must be the word the server sent and one
that `listen` finds in that recording. Saves a screenshot (KWS_SERVE_SCREENSHOT=path to keep it).

By default the model is the session's tiny checkpoint and the word its most confident synthetic clip;
KWS_SERVE_CKPT=CKPT KWS_SERVE_CLIP=word.wav run the same test with a real model and recording (how
docs/serve_page.png was made)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from urllib.request import Request, urlopen

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("starlette", reason="the service needs the serve extra: pip install -e '.[serve]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (dev extra)")

from serve_helpers import confident_clips, detector_for, running_server, write_stream  # noqa: E402

from kws_lightning.inference import Predictor  # noqa: E402
from kws_lightning.listen import RecognizeCommands, StreamingDetector, listen_file  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="headless browser test needs Chromium and its driver: apt-get install chromium chromium-driver",
)


def browser(fake_audio: Path, extra: tuple[str, ...] = ()) -> object:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # CI containers run as root
        "--disable-dev-shm-usage",
        "--window-size=1100,720",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_audio}",
        *extra,
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


def wait_for(driver: object, script: str, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.25)
    errors = driver.execute_script("return window.kws && window.kws.errors")
    raise AssertionError(f"timed out after {timeout} s waiting for: {script}\npage errors: {errors}")


ERROR_MESSAGE = "const m = document.getElementById('message'); return m.className == 'error' && m.textContent"


def open_page(driver: object, url: str) -> None:
    driver.get(url)
    wait_for(driver, "return document.querySelectorAll('#bars .bar').length", 30)  # /health answered
    driver.find_element("id", "start").click()


def test_live_page_hears_the_fake_microphone(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if os.environ.get("KWS_SERVE_CKPT") and os.environ.get("KWS_SERVE_CLIP"):
        ckpt, word = Path(os.environ["KWS_SERVE_CKPT"]), Path(os.environ["KWS_SERVE_CLIP"])
    else:
        tiny_checkpoint = request.getfixturevalue("tiny_checkpoint")
        ckpt = tiny_checkpoint["ckpt"]
        word = confident_clips(ckpt, tiny_checkpoint["data_root"], 1)[0][0]
    # Chromium loops the file: a word between gaps, heard again and again.
    recording = write_stream([word], tmp_path / "fake_microphone.wav", gap_s=1.0)
    looped = tmp_path / "looped.wav"
    sf.write(looped, np.tile(sf.read(recording, dtype="int16")[0], 3), 16000, subtype="PCM_16")
    predictor = Predictor.from_checkpoints(ckpt, "cpu")
    # Below the recording's peak: the browser hears it through resampling, at another phase of the hop.
    settings = detector_for(predictor, looped, fraction=0.8)
    detector = StreamingDetector(predictor, RecognizeCommands(predictor.labels, **settings))
    heard, _ = listen_file(detector, str(looped), echo=False)
    expected = {d.keyword for d in heard}
    assert expected, f"listen finds nothing in {looped}: the test needs a recording the model detects"

    with running_server(ckpt, tmp_path / "serve", settings) as url:
        denied = browser(recording, ("--deny-permission-prompts",))
        try:
            open_page(denied, url)
            assert "Microphone access was denied" in wait_for(denied, ERROR_MESSAGE, 30)
        finally:
            denied.quit()

        driver = browser(recording, ("--use-fake-ui-for-media-stream",))
        open_page(driver, url)
        wait_for(driver, "return document.querySelector('#detections li.detection')", 90)
        shown = driver.find_element("css selector", "#detections li.detection")
        keyword = shown.get_attribute("data-keyword")
        sent = driver.execute_script("return window.kws.detections")
        assert keyword == sent[-1]["keyword"]  # the newest detection is on top
        assert keyword in expected, f"page shows {keyword!r}; listen finds {sorted(expected)}"
        assert shown.find_element("css selector", ".keyword").text == keyword
        # The bars show a posterior row (summing to 1), and the log-mel picture has been painted.
        widths = driver.execute_script(
            "return [...document.querySelectorAll('#bars .fill')].map(e => parseFloat(e.style.width) || 0)"
        )
        assert len(widths) == len(predictor.labels) and sum(widths) == pytest.approx(100, abs=2)
        painted = driver.execute_script(
            "const c = document.getElementById('mel'); const d = c.getContext('2d')"
            ".getImageData(c.width - 50, 0, 50, c.height).data;"
            "let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] + d[i + 1] + d[i + 2] > 0; return n;"
        )
        assert painted > 0
        # The file picker posts the word to /predict; the page prints the server's label and top-k.
        driver.find_element("id", "file").send_keys(str(word))
        result = wait_for(
            driver,
            "const r = document.getElementById('result').textContent; "
            "return r && !r.startsWith('scoring') ? r : null",
            30,
        )
        headers = {"Content-Type": "audio/wav"}  # urllib's default, form-urlencoded, is refused (415)
        answer = json.loads(urlopen(Request(f"{url}/predict", word.read_bytes(), headers)).read())
        assert result.startswith(f"{word.name}: {answer['label']} ({answer['score']:.3f})")
        shot = tmp_path / "serve_page.png"
        driver.save_screenshot(str(shot))
        if os.environ.get("KWS_SERVE_SCREENSHOT"):
            shutil.copy(shot, os.environ["KWS_SERVE_SCREENSHOT"])
    try:  # the server has stopped: the page must say so
        assert "connection to the server was lost" in wait_for(driver, ERROR_MESSAGE, 30)
    finally:
        driver.quit()
