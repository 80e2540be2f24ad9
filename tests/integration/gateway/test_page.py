"""The page at ``/`` in a real browser (headless Chromium from Debian's ``chromium`` and
``chromium-driver`` packages, driven by Selenium): submit from the page, watch the answer
stream in, and find it equal to the job's result; the jobs view lists the job."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from producer import Producer
from tests.integration.gateway.conftest import MODEL

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM or not DRIVER:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium "
                    "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="vlmq-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def text_of(browser: Any, element_id: str) -> str:
    return str(browser.execute_script(
        "return document.getElementById(arguments[0]).textContent", element_id))


def test_the_page_streams_a_jobs_answer(browser: Any, gateway: Any, image_server: Any,
                                        producer: Producer) -> None:
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 120, poll_frequency=0.1)
    browser.get(gateway.url + "/")
    wait.until(lambda b: MODEL in [o.text for o in Select(b.find_element("id", "model")).options])
    Select(browser.find_element("id", "model")).select_by_value(MODEL)
    browser.find_element("id", "image-url").send_keys(image_server.url("/cats.png"))
    tokens = browser.find_element("id", "max-tokens")
    tokens.clear()
    tokens.send_keys("80")
    browser.find_element("id", "send").click()
    seen: list[str] = []

    def finished(b: Any) -> bool:
        seen.append(text_of(b, "answer"))
        return text_of(b, "status") in ("done", "cancelled") or \
            text_of(b, "status").startswith(("error", "failed"))

    wait.until(finished)
    assert text_of(browser, "status") == "done"
    job_id = text_of(browser, "job-id")
    result = producer.result(job_id, timeout=60)
    assert text_of(browser, "answer") == result.text and result.text
    partial = [s for s in seen if s and s != result.text]
    assert all(result.text.startswith(s) for s in partial)  # it grew, in order
    wait.until(lambda b: b.find_elements("css selector", f'tr[data-job-id="{job_id}"]'))
    row = browser.find_element("css selector", f'tr[data-job-id="{job_id}"]')
    assert "SUCCEEDED" in row.text


def test_cancel_on_the_page_cancels_the_job(browser: Any, gateway: Any,
                                            producer: Producer) -> None:
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 120, poll_frequency=0.1)
    browser.get(gateway.url + "/")
    wait.until(lambda b: MODEL in [o.text for o in Select(b.find_element("id", "model")).options])
    Select(browser.find_element("id", "model")).select_by_value(MODEL)
    tokens = browser.find_element("id", "max-tokens")
    tokens.clear()
    tokens.send_keys("4096")
    browser.find_element("id", "send").click()
    wait.until(lambda b: text_of(b, "answer"))  # it streams
    job_id = text_of(browser, "job-id")
    browser.find_element("id", "cancel").click()
    wait.until(lambda b: text_of(b, "status") == "cancelled")
    state = producer.wait(job_id, timeout=60)
    assert state.status == "CANCELLED" and state.finish_reason == "cancelled"
    assert producer.result(job_id).text.startswith(text_of(browser, "answer"))
