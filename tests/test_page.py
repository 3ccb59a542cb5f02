"""The chat page in headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium):
load it, send a message, watch the answer stream in, take a screenshot. Skipped without Chromium."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver "
                                "(apt install chromium chromium-driver)")


@pytest.fixture(scope="module")
def page_server():
    from serving import served, smollm2_backend

    with served({"smollm2": smollm2_backend()}) as srv:
        yield srv


def test_page_streams_an_answer_and_shows_who_answered(page_server, tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,700"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        browser.get(page_server.url + "/")
        WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "model").get_attribute("value") == "smollm2")
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("40")
        browser.find_element(By.ID, "temperature").clear()
        browser.find_element(By.ID, "temperature").send_keys("0")
        browser.find_element(By.ID, "input").send_keys("What is the capital of France?")
        browser.find_element(By.ID, "send").click()
        seen = set()  # the answer's text at successive moments: streaming shows more than one
        def answered(b):
            bubbles = b.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            if bubbles:
                seen.add(bubbles[-1].text)
            meta = b.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta")
            return meta and meta[-1].text
        meta = WebDriverWait(browser, 60, poll_frequency=0.05).until(answered)
        reply = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text
        assert "Paris" in reply and "answered by smollm2" in meta and "tok/s" in meta
        assert len(seen) >= 2  # it arrived in pieces, not at once
        shot = Path(os.environ.get("SLMKIT_SCREENSHOT", tmp_path / "chat.png"))
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 1000
    finally:
        browser.quit()
