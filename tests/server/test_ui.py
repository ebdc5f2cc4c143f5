"""The chat page in a real browser: Debian's chromium + chromium-driver, driven by selenium,
against a live tiny-model server with a memory model and an API key. Nothing is downloaded:
the driver and browser are the system's (CI installs them; elsewhere the test says how)."""

from __future__ import annotations

import os
import shutil
import threading
import time

import httpx
import pytest

from tests.live_server import LiveServer

KEY = "page-key"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    if os.environ.get("CI"):
        raise RuntimeError("CI needs chromium and chromium-driver (apt-get install chromium chromium-driver)")
    pytest.skip("needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver",
                allow_module_level=True)


@pytest.fixture(scope="module")
def srv(llama_artifact, mm_checkpoint):
    from server.config import ServerConfig

    s = LiveServer(ServerConfig(artifacts=[f"tiny-chat={llama_artifact}"], memory_model=str(mm_checkpoint),
                                max_model_len=1024, api_keys=[KEY], max_num_seqs=1, max_queue=0)).wait()
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    yield driver
    driver.quit()


def _wait(cond, timeout: float = 30.0):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(None, timeout, poll_frequency=0.1).until(lambda _: cond())


def _open(browser, srv):
    from selenium.webdriver.common.by import By
    browser.get(srv.url + "/")
    key = browser.find_element(By.ID, "api-key")
    key.clear()
    key.send_keys(KEY)
    browser.execute_script("document.getElementById('api-key').dispatchEvent(new Event('change'))")
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#model option"))


def _send(browser, text: str):
    from selenium.webdriver.common.by import By
    browser.find_element(By.ID, "prompt").send_keys(text)
    browser.find_element(By.ID, "send").click()


def _answers(browser):
    from selenium.webdriver.common.by import By
    return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def test_page_needs_the_key_then_streams_an_answer_with_stats(browser, srv):
    from selenium.webdriver.common.by import By
    browser.get(srv.url + "/")
    err = browser.find_element(By.ID, "error")
    _wait(lambda: err.is_displayed() and "API key" in err.text)  # /v1/models refused without the key
    _open(browser, srv)
    assert [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#model option")] == ["tiny-chat"]
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("12")
    _send(browser, "Paris is the capital of")
    bubble = _wait(lambda: _answers(browser) and _answers(browser)[-1])
    stats = bubble.find_element(By.CLASS_NAME, "stats")
    _wait(lambda: "TTFT" in stats.text)
    assert bubble.find_element(By.CLASS_NAME, "content").text.strip()
    assert "completion tokens" in stats.text and not browser.find_element(By.ID, "error").is_displayed()


def test_hybrid_answer_has_a_reasoning_panel_that_opens(browser, srv):
    from selenium.webdriver.common.by import By
    _open(browser, srv)
    browser.find_element(By.ID, "clear").click()
    browser.find_element(By.ID, "loops").send_keys("1")
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("8")
    _send(browser, "Sam has 3 apples and buys 4 more. How many apples?")
    bubble = _wait(lambda: _answers(browser) and _answers(browser)[-1])
    _wait(lambda: "loop(s)" in bubble.find_element(By.CLASS_NAME, "stats").text, timeout=60)
    panel = bubble.find_element(By.CSS_SELECTOR, "details.reasoning")
    assert not panel.find_element(By.TAG_NAME, "pre").is_displayed()  # collapsed until opened
    panel.find_element(By.TAG_NAME, "summary").click()
    pre = panel.find_element(By.TAG_NAME, "pre")
    assert pre.is_displayed() and "[loop 1] reasoning" in pre.text and "condensed prompt" in pre.text
    assert "peak context" in bubble.find_element(By.CLASS_NAME, "stats").text


def test_errors_are_shown_not_swallowed(browser, srv):
    from selenium.webdriver.common.by import By
    _open(browser, srv)
    browser.find_element(By.ID, "loops").clear()
    err = browser.find_element(By.ID, "error")
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("100000")  # more than the context window: 400
    _send(browser, "hello")
    _wait(lambda: err.is_displayed() and "HTTP 400" in err.text and "context window" in err.text)
    # every row busy and no queue: 429 with Retry-After
    busy = threading.Thread(target=lambda: httpx.post(
        srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
        json={"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 600,
              "ignore_eos": True}))
    busy.start()
    try:
        deadline = time.time() + 10
        while time.time() < deadline and "hybrid_requests_running 1.0" not in httpx.get(srv.url + "/metrics").text:
            time.sleep(0.02)
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("4")
        _send(browser, "hello again")
        _wait(lambda: "HTTP 429" in err.text and "retry after" in err.text)
    finally:
        busy.join()
