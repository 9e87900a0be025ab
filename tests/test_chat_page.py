"""The gateway's chat page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by selenium, against a real broker, hub, llama-cpp node on the
bundled SmolLM2 model, and the real gateway.

The page is one file, hub/static/index.html; the gateway serves it at ``/``. The tests read it
the way a person would: the model list fills in, the node shows up in the side panel, an answer
streams in piece by piece and ends with the node that gave it and its speed; Stop ends an answer
(and the hub hears of it); a wrong token is said so.

``NOVA_SWARM_SCREENSHOT=path`` also saves the first test's final screenshot there (the README's
picture, hub/static/screenshot.png, is made that way).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nova_swarm.broker.net import free_port

from .conftest import Processes, RunningBroker, until, wait_online

pytestmark = [pytest.mark.llama, pytest.mark.timeout(300)]

MODEL = "SmolLM2-135M-Instruct.Q4_1"
NODE = "laptop"
ANSWER = "#messages .message.assistant:last-child"
# Long enough (the node's default cap is 256 tokens) that the answer is seen mid-stream.
STORY = "Write a short story about a robot who learns to paint."


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("needs Debian's chromium and chromium-driver (`make test-deps` installs them)")
    return browser, driver


@contextmanager
def headless_chromium() -> Iterator[Any]:
    """Debian's Chromium through its own chromedriver: selenium-manager never downloads one."""
    browser, driver = chromium_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


@dataclass
class Swarm:
    url: str
    token: str
    procs: Processes


@asynccontextmanager
async def swarm_with_gateway(broker: RunningBroker, tmp_path: Path) -> AsyncIterator[Swarm]:
    """`swarm-hub serve` with its gateway on a free port, as users run it, and one
    `swarm-node run` on the bundled model."""
    chromium_paths()  # skip before starting anything
    procs = Processes(broker, tmp_path)
    port = free_port()
    try:
        procs.hub("--http", f"127.0.0.1:{port}")
        procs.node(NODE)
        await wait_online(procs, 1)
        url = f"http://127.0.0.1:{port}"
        await until(lambda: _serves(url), timeout=30, what="the gateway of swarm-hub serve")
        yield Swarm(url, broker.home.gateway_token(), procs)
    finally:
        procs.close()


def _serves(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


# Records every text the answer showed while it was still streaming, from inside the page, so
# that no partial text is missed between two polls of the test.
WATCH_PARTIALS = """
window.__partials = [];
new MutationObserver(() => {
  const answer = document.querySelector('#messages .message.assistant:last-child');
  if (!answer || answer.dataset.state !== 'streaming') return;
  const text = answer.querySelector('.content').textContent;
  const seen = window.__partials;
  if (text && seen[seen.length - 1] !== text) seen.push(text);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


def open_page(chrome: Any, swarm: Swarm) -> None:
    """The page with the token in the fragment; ready once the model and the node are listed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chrome.get(f"{swarm.url}/#token={swarm.token}")
    # The token left the address bar and stayed in localStorage.
    assert "token" not in chrome.current_url
    assert chrome.execute_script("return localStorage.getItem('nova-swarm.token')") == swarm.token
    wait = WebDriverWait(chrome, 60, poll_frequency=0.1)
    wait.until(lambda c: c.find_elements(By.CSS_SELECTOR, f"#model option[value='{MODEL}']"))
    online = f"#nodes li.node[data-node-id='{NODE}'][data-state='online']"
    wait.until(lambda c: c.find_elements(By.CSS_SELECTOR, online))


def text_of(chrome: Any, selector: str) -> str:
    from selenium.webdriver.common.by import By

    return str(chrome.find_element(By.CSS_SELECTOR, selector).get_attribute("textContent"))


def ask_and_watch(swarm: Swarm, prompt: str, screenshots: list[Path]) -> dict[str, Any]:
    """Everything the browser does in the streaming test, in one thread (selenium blocks)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with headless_chromium() as chrome:
        open_page(chrome, swarm)
        node = chrome.find_element(By.CSS_SELECTOR, f"#nodes li.node[data-node-id='{NODE}']")
        assert node.find_element(By.CSS_SELECTOR, ".model").text == MODEL
        assert chrome.find_element(By.ID, "model").get_attribute("value") == MODEL
        assert chrome.find_element(By.ID, "strategy").get_attribute("value") == "race"

        chrome.execute_script(WATCH_PARTIALS)
        box = chrome.find_element(By.ID, "prompt")
        box.send_keys("first line")
        box.send_keys(Keys.SHIFT, Keys.ENTER)  # (a modifier stays down until the call ends)
        box.send_keys("second line")
        assert box.get_attribute("value") == "first line\nsecond line"  # Shift+Enter: a new line
        box.clear()
        box.send_keys(prompt, Keys.ENTER)  # Enter sends

        answer = WebDriverWait(chrome, 10).until(lambda c: c.find_elements(By.CSS_SELECTOR, ANSWER))[0]
        finished = WebDriverWait(chrome, 180, poll_frequency=0.2)
        finished.until(lambda c: answer.get_attribute("data-state") != "streaming")
        chrome.execute_script("document.activeElement.blur()")  # no caret in the picture
        for path in screenshots:
            path.parent.mkdir(parents=True, exist_ok=True)
            assert chrome.save_screenshot(str(path))
        return {
            "state": answer.get_attribute("data-state"),
            "text": text_of(chrome, f"{ANSWER} .content"),
            "meta": text_of(chrome, f"{ANSWER} .meta"),
            "node": answer.get_attribute("data-node-id"),
            "partials": chrome.execute_script("return window.__partials"),
            "error": text_of(chrome, "#error"),
            "user": [m.text for m in chrome.find_elements(By.CSS_SELECTOR, "#messages .message.user .content")],
            "send_visible": chrome.find_element(By.ID, "send").is_displayed(),
        }


async def test_an_answer_streams_into_the_page_with_the_node_and_its_speed(
    amqtt: RunningBroker, tmp_path: Path
) -> None:
    shots = [tmp_path / "chat-page.png"]
    if os.environ.get("NOVA_SWARM_SCREENSHOT"):
        shots.append(Path(os.environ["NOVA_SWARM_SCREENSHOT"]))
    async with swarm_with_gateway(amqtt, tmp_path) as swarm:
        seen = await asyncio.to_thread(ask_and_watch, swarm, STORY, shots)

    assert seen["state"] == "done", seen
    assert seen["error"] == ""
    assert seen["user"] == [STORY]
    final = seen["text"]
    assert final.strip()
    # It streamed: the page showed at least two different partial texts, or one shorter than the end.
    partials = seen["partials"]
    assert len(set(partials)) >= 2 or any(len(p) < len(final) for p in partials), partials
    assert all(final.startswith(p) for p in partials), (partials, final)
    # Under the answer: which node gave it, its speed and the latency.
    assert seen["node"] == NODE
    assert f"node {NODE}" in seen["meta"] and "tok/s" in seen["meta"] and " ms" in seen["meta"], seen["meta"]
    assert seen["send_visible"]
    assert (tmp_path / "chat-page.png").stat().st_size > 10_000


def stop_midway_then_bad_token(swarm: Swarm, prompt: str, hub_heard: Any) -> dict[str, Any]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    seen: dict[str, Any] = {}
    with headless_chromium() as chrome:
        open_page(chrome, swarm)
        chrome.find_element(By.ID, "prompt").send_keys(prompt, Keys.ENTER)
        wait = WebDriverWait(chrome, 60, poll_frequency=0.05)
        answer = wait.until(lambda c: c.find_elements(By.CSS_SELECTOR, ANSWER))[0]
        # Some text is in, the rest is still coming: stop it.
        wait.until(lambda c: text_of(c, f"{ANSWER} .content").strip())
        assert answer.get_attribute("data-state") == "streaming"
        chrome.find_element(By.ID, "stop").click()
        wait.until(lambda c: answer.get_attribute("data-state") != "streaming")
        seen["state"] = answer.get_attribute("data-state")
        seen["note"] = text_of(chrome, f"{ANSWER} .note")
        seen["partial"] = text_of(chrome, f"{ANSWER} .content")
        seen["error_hidden"] = not chrome.find_element(By.ID, "error").is_displayed()
        seen["send_visible"] = chrome.find_element(By.ID, "send").is_displayed()
        seen["stop_visible"] = chrome.find_element(By.ID, "stop").is_displayed()
        # Text from people and models goes in as text, never as markup.
        seen["user"] = text_of(chrome, "#messages .message.user .content")
        seen["markup"] = len(chrome.find_elements(By.CSS_SELECTOR, "#messages b"))
        # The hub was told, and the node is free again.
        WebDriverWait(chrome, 30, poll_frequency=0.2).until(lambda c: hub_heard())
        WebDriverWait(chrome, 30, poll_frequency=0.2).until(
            lambda c: text_of(c, f"#nodes li.node[data-node-id='{NODE}'] dd.busy") == "0"
        )

        # A wrong token: the page says so, plainly.
        field = chrome.find_element(By.ID, "token")
        field.clear()
        field.send_keys("sk-swarm-not-the-right-token", Keys.TAB)
        wait.until(lambda c: c.find_element(By.ID, "error").is_displayed())
        seen["bad_token"] = text_of(chrome, "#error")
        seen["stored"] = chrome.execute_script("return localStorage.getItem('nova-swarm.token')")
    return seen


async def test_stop_ends_the_answer_and_a_wrong_token_is_explained(amqtt: RunningBroker, tmp_path: Path) -> None:
    prompt = "Tell me a long story about <b>bold</b> robots & their paint."
    async with swarm_with_gateway(amqtt, tmp_path) as swarm:

        def hub_heard() -> bool:
            return "client cancelled the request" in swarm.procs.log("hub")

        seen = await asyncio.to_thread(stop_midway_then_bad_token, swarm, prompt, hub_heard)

    assert seen["state"] == "stopped", seen
    assert seen["note"] == "stopped"
    assert seen["partial"].strip() and seen["partial"] != "…"
    assert seen["error_hidden"] and seen["send_visible"] and not seen["stop_visible"], seen
    assert seen["user"] == prompt and seen["markup"] == 0
    assert "refused the token" in seen["bad_token"] and "incorrect API key" in seen["bad_token"], seen["bad_token"]
    assert seen["stored"] == "sk-swarm-not-the-right-token"
