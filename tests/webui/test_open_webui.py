"""Open WebUI, the chat UI most of our users put in front of the dispatcher, tried for real.

PyPI's ``open-webui`` (its own cached virtualenv, :mod:`harness.open_webui`)
is pointed at a local stack (sender, consumers, simulators, the test broker
and database) with a token, and driven in Debian's headless Chromium through
Selenium, as a user would: its model list shows our models, a chat is
answered as a stream through it, and its stop button cancels the generation
at the backend (the simulator counts the request as abandoned and stops
generating; the consumer logs it as cancelled). Not part of ``make test``:
``make webui-test`` runs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement

from harness import open_webui
from harness.processes import Processes
from harness.stack import Service
from harness.testrun import unique
from harness.vllm_cpu import SetupError

pytestmark = pytest.mark.timeout(600)  # Open WebUI takes a minute or two to start on a busy machine

SLOW_TOKENS = 3000
"""The slow model's answer: 3,000 tokens at 50 ms each, minutes unless stopped."""
WAIT = 90.0
"""Seconds any one step in the browser may take (Open WebUI is slow on a busy 2-core machine)."""


@pytest.fixture(scope="module")
def installed() -> tuple[str, str]:
    """Open WebUI's virtualenv and the browser; the test fails (never skips) saying why if they cannot be."""
    try:
        open_webui.setup()
        return open_webui.browser_setup()
    except SetupError as exc:
        pytest.fail(f"Open WebUI could not be set up: {exc}")


@pytest.fixture(scope="module")
def fast_model(processes: Processes) -> str:
    model = unique("webui-chat")
    processes.consumer(model, processes.simulator(model))
    return model


@pytest.fixture(scope="module")
def slow_model(processes: Processes) -> tuple[str, Service, Service]:
    model = unique("webui-long")
    backend = processes.simulator(model, itl_ms=50, default_max_tokens=SLOW_TOKENS)
    return model, backend, processes.consumer(model, backend)


@pytest.fixture(scope="module")
def webui(
    installed: tuple[str, str],
    processes: Processes,
    sender: Service,
    token: str,
    fast_model: str,
    slow_model: tuple[str, Service, Service],
    log_dir: Path,
) -> Service:
    service = open_webui.start(log_dir, dispatcher_url=sender.url, api_key=token)
    processes.services.append(service)  # stopped with the rest
    return service


@pytest.fixture(scope="module")
def browser(installed: tuple[str, str], log_dir: Path) -> Iterator[WebDriver]:
    chromium, driver = installed
    options = Options()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    session = webdriver.Chrome(service=DriverService(driver), options=options)
    session.set_page_load_timeout(WAIT)
    try:
        yield session
    finally:
        session.quit()


def until(what: str, condition: Callable[[], Any], browser: WebDriver, log_dir: Path) -> Any:
    """``condition()``'s first truthy value within ``WAIT`` seconds; else fail with a screenshot."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            value = condition()
        except WebDriverException:
            value = None
        if value:
            return value
        time.sleep(0.25)
    shot = log_dir / f"webui-{int(time.time())}.png"
    browser.save_screenshot(str(shot))
    raise AssertionError(f"Open WebUI: {what} did not happen within {WAIT:.0f} s (screenshot: {shot})")


def open_chat(browser: WebDriver, webui: Service, log_dir: Path, model: str | None = None) -> None:
    """A new chat (with ``model`` selected), past the release notes shown on a first visit."""
    browser.get(webui.url + (f"/?models={model}" if model else "/"))
    until("the chat input", lambda: browser.find_elements(By.ID, "chat-input"), browser, log_dir)
    for button in browser.find_elements(By.XPATH, '//button[contains(., "Okay, Let\'s Go!")]'):
        button.click()
    if model is not None:
        until(
            f"selecting {model}",
            lambda: model in browser.find_element(By.ID, "model-selector-model-button").text,
            browser,
            log_dir,
        )


def send(browser: WebDriver, text: str) -> None:
    box = browser.find_element(By.ID, "chat-input")
    box.click()
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def answer_text(browser: WebDriver) -> str:
    """The text of the last assistant message shown."""
    answers: list[WebElement] = browser.find_elements(By.CSS_SELECTOR, "#response-content-container")
    return answers[-1].text.strip() if answers else ""


def menu_entry(browser: WebDriver, model: str) -> Callable[[], list[WebElement]]:
    """The model menu's entry for ``model``, as a condition for :func:`until`."""
    return lambda: browser.find_elements(By.CSS_SELECTOR, f"button[aria-label='Select {model} model']")


def request_lines(service: Service, model: str) -> list[dict[str, Any]]:
    lines = []
    for line in service.log_path.read_text(errors="replace").splitlines():
        if model in line and '"msg":"request"' in line:
            entry = orjson.loads(line)
            if entry.get("model") == model:
                lines.append(entry)
    return lines


def metric(backend: Service, name: str) -> float:
    for line in httpx.get(f"{backend.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{backend.name} has no metric {name}")


def test_the_model_list_shows_our_models(
    webui: Service,
    browser: WebDriver,
    fast_model: str,
    slow_model: tuple[str, Service, Service],
    log_dir: Path,
) -> None:
    open_chat(browser, webui, log_dir)
    browser.find_element(By.ID, "model-selector-model-button").click()
    search = until(
        "the model menu",
        lambda: browser.find_elements(By.CSS_SELECTOR, "input[placeholder*='Search']"),
        browser,
        log_dir,
    )[0]
    for model in (fast_model, slow_model[0]):
        search.clear()
        search.send_keys(model)
        until(f"{model} in the model menu", menu_entry(browser, model), browser, log_dir)
    search.send_keys(Keys.ESCAPE)


def test_a_chat_is_streamed_through_it(
    webui: Service, browser: WebDriver, sender: Service, fast_model: str, log_dir: Path
) -> None:
    open_chat(browser, webui, log_dir, fast_model)
    send(browser, "Hello from Open WebUI")
    text = until("an answer", lambda: answer_text(browser), browser, log_dir)
    assert text
    lines = until("the sender's log line", lambda: request_lines(sender, fast_model), browser, log_dir)
    assert [(line["path"], line["stream"], line["status"]) for line in lines] == [
        ("/v1/chat/completions", True, 200)
    ], lines


def test_the_stop_button_cancels_the_generation_at_the_backend(
    webui: Service, browser: WebDriver, slow_model: tuple[str, Service, Service], log_dir: Path
) -> None:
    model, backend, consumer = slow_model
    open_chat(browser, webui, log_dir, model)
    send(browser, "Tell me a very long story")
    until("the answer to start", lambda: answer_text(browser), browser, log_dir)
    assert metric(backend, "vllm:num_requests_running") == 1
    until(
        "the stop button",
        lambda: browser.find_elements(By.CSS_SELECTOR, "button[aria-label='Stop']"),
        browser,
        log_dir,
    )[0].click()
    until(
        "the backend to drop the request",
        lambda: metric(backend, "simulator:requests_aborted_total") == 1,
        browser,
        log_dir,
    )
    assert metric(backend, "vllm:num_requests_running") == 0
    assert metric(backend, "vllm:generation_tokens_total") < SLOW_TOKENS
    lines = until("the consumer's log line", lambda: request_lines(consumer, model), browser, log_dir)
    assert [line["outcome"] for line in lines] == ["cancelled"], lines
