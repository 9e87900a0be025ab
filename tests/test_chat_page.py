"""The gateway's chat page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by selenium, against a real broker, hub and gateway, and a node:
llama-cpp on the bundled SmolLM2 model where the test is about answers streaming and stopping,
the fake engine in its ``echo`` mode where it is about what the page sends and how it draws
markdown (the echo is the question, as markdown, then a fenced JSON block of exactly what
reached the node: messages, max_tokens, temperature).

The page is one file, hub/static/index.html; the gateway serves it at ``/``. The tests read it
the way a person would: the model list fills in, the node shows up in the side panel, an answer
streams in piece by piece and ends with the node that gave it and its speed; Stop ends an answer
(and the hub hears of it); a wrong token is said so; markdown is drawn (code highlighted, with a
copy button; no markup or javascript: link from the model gets through); the system prompt,
temperature and max tokens reach the node; conversations survive a reload, and can be switched,
regenerated and deleted.

``NOVA_SWARM_SCREENSHOT=path`` also saves the first test's final screenshot there (the README's
picture, hub/static/screenshot.png, is made that way).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nova_swarm.broker.link.net import free_port

from .conftest import Processes, RunningBroker, until, wait_online

pytestmark = [pytest.mark.timeout(300)]

MODEL = "SmolLM2-135M-Instruct.Q4_1"
NODE = "laptop"
ANSWER = "#messages .message.assistant:last-child"
# Long enough (the node's default cap is 256 tokens) that the answer is seen mid-stream.
STORY = "Write a short story about a robot who learns to paint."
# SmolLM2 answers this with markdown and a fenced Python block: the README's picture.
CODE_QUESTION = "Write a Python function that reverses a string."


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
async def swarm_with_gateway(
    broker: RunningBroker, tmp_path: Path, *node_args: str, node: str = NODE
) -> AsyncIterator[Swarm]:
    """`swarm-hub serve` with its gateway on a free port, as users run it, and one
    `swarm-node run` (on the bundled model unless ``node_args`` say otherwise)."""
    chromium_paths()  # skip before starting anything
    procs = Processes(broker, tmp_path)
    port = free_port()
    try:
        procs.hub("--http", f"127.0.0.1:{port}")
        procs.node(node, *node_args)
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


def open_page(chrome: Any, swarm: Swarm, *, model: str = MODEL, node: str = NODE) -> None:
    """The page with the token in the fragment; ready once the model and the node are listed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chrome.get(f"{swarm.url}/#token={swarm.token}")
    # The token left the address bar and stayed in localStorage.
    assert "token" not in chrome.current_url
    assert chrome.execute_script("return localStorage.getItem('nova-swarm.token')") == swarm.token
    wait = WebDriverWait(chrome, 60, poll_frequency=0.1)
    wait.until(lambda c: c.find_elements(By.CSS_SELECTOR, f"#model option[value='{model}']"))
    online = f"#nodes li.node[data-node-id='{node}'][data-state='online']"
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


@pytest.mark.llama
async def test_an_answer_streams_into_the_page_with_the_node_and_its_speed(
    amqtt: RunningBroker, tmp_path: Path
) -> None:
    shots = [tmp_path / "chat-page.png"]
    if os.environ.get("NOVA_SWARM_SCREENSHOT"):
        shots.append(Path(os.environ["NOVA_SWARM_SCREENSHOT"]))
    async with swarm_with_gateway(amqtt, tmp_path) as swarm:
        seen = await asyncio.to_thread(ask_and_watch, swarm, CODE_QUESTION, shots)

    assert seen["state"] == "done", seen
    assert seen["error"] == ""
    assert seen["user"] == [CODE_QUESTION]
    final = seen["text"]
    assert final.strip()
    # It streamed: the page showed at least two different partial texts, or one shorter than the end.
    partials = seen["partials"]
    # (Not each a prefix of the end: "**Tit" is drawn as text until its closing "**" arrives.)
    assert len(set(partials)) >= 2 or any(len(p) < len(final) for p in partials), partials
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

        # A reload keeps the stopped answer, as far as it got, marked stopped.
        chrome.refresh()
        wait.until(lambda c: c.find_elements(By.CSS_SELECTOR, f"{ANSWER}[data-state='stopped']"))
        seen["reloaded"] = (text_of(chrome, f"{ANSWER} .content"), text_of(chrome, f"{ANSWER} .note"))

        # A wrong token: the page says so, plainly.
        field = chrome.find_element(By.ID, "token")
        field.clear()
        field.send_keys("sk-swarm-not-the-right-token", Keys.TAB)
        wait.until(lambda c: c.find_element(By.ID, "error").is_displayed())
        seen["bad_token"] = text_of(chrome, "#error")
        seen["stored"] = chrome.execute_script("return localStorage.getItem('nova-swarm.token')")
    return seen


@pytest.mark.llama
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
    assert seen["reloaded"] == (seen["partial"], "stopped"), seen["reloaded"]
    assert "refused the token" in seen["bad_token"] and "incorrect API key" in seen["bad_token"], seen["bad_token"]
    assert seen["stored"] == "sk-swarm-not-the-right-token"


# ---------------------------------------------------------------- markdown, settings, conversations

ECHO_NODE = "desk"
ECHO_MODEL = "fake"  # the fake engine's model name
ECHO_ARGS = ("--engine", "fake", "--engine-option", "echo=true", "--no-updates")
SYSTEM = "You are a terse pirate."
# Markdown as a person types it (Shift+Enter between lines), with things that must stay text.
QUESTION = [
    "# Plan for *today*",
    "",
    "- **first** step, see [the docs](https://example.com/docs)",
    "- then [click me](javascript:alert(1)) and `rm -rf /`",
    "",
    "<img src=x onerror=alert(1)> <script>alert(2)</script>",
]
QUESTION_TEXT = "\n".join(QUESTION)


def type_lines(box: Any, lines: list[str]) -> None:
    """Each line, Shift+Enter between them, then Enter: as a person writes a long message."""
    from selenium.webdriver.common.keys import Keys

    for k, line in enumerate(lines):
        if k:
            box.send_keys(Keys.SHIFT, Keys.ENTER)
        if line:
            box.send_keys(line)
    box.send_keys(Keys.ENTER)


def received(chrome: Any, answer: str = ANSWER) -> dict[str, Any]:
    """What the echo node says it was given: the JSON in the answer's code block, as drawn."""
    code = text_of(chrome, f"{answer} .content .codeblock pre code.language-json")
    parsed: dict[str, Any] = json.loads(code)
    return parsed


def fill(chrome: Any, field_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = chrome.find_element(By.ID, field_id)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    if value:
        field.send_keys(value)


def wait_answered(chrome: Any, count: int) -> Any:
    """Until the page holds ``count`` answers and the last one is no longer streaming."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def done(c: Any) -> Any:
        answers = c.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")
        if len(answers) == count and answers[-1].get_attribute("data-state") not in (None, "streaming"):
            return answers[-1]
        return None

    return WebDriverWait(chrome, 60, poll_frequency=0.1).until(done)


def markdown_settings_and_conversations(swarm: Swarm, screenshots: list[Path]) -> dict[str, Any]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    seen: dict[str, Any] = {}
    css = By.CSS_SELECTOR
    with headless_chromium() as chrome:
        open_page(chrome, swarm, model=ECHO_MODEL, node=ECHO_NODE)
        wait = WebDriverWait(chrome, 30, poll_frequency=0.1)
        box = chrome.find_element(By.ID, "prompt")

        # A bad max tokens is said so, and nothing is sent.
        fill(chrome, "max-tokens", "0")
        box.send_keys("hello", Keys.ENTER)
        wait.until(lambda c: c.find_element(By.ID, "error").is_displayed())
        seen["bad_max"] = text_of(chrome, "#error")
        seen["sent_when_bad"] = len(chrome.find_elements(css, "#messages .message"))
        box.clear()

        # The settings of this conversation, then a markdown question.
        fill(chrome, "system", SYSTEM)
        fill(chrome, "temperature", "0.3")
        fill(chrome, "max-tokens", "300")
        type_lines(box, QUESTION)
        answer = wait_answered(chrome, 1)
        seen["state"] = answer.get_attribute("data-state")
        seen["received"] = received(chrome)
        seen["meta"] = text_of(chrome, f"{ANSWER} .meta")
        md = f"{ANSWER} .content"
        seen["h1"] = text_of(chrome, f"{md} h1")
        seen["h1_em"] = text_of(chrome, f"{md} h1 em")
        seen["strong"] = text_of(chrome, f"{md} li strong")
        seen["inline_code"] = text_of(chrome, f"{md} li code")
        seen["links"] = [a.get_attribute("href") for a in chrome.find_elements(css, f"{md} a")]
        seen["link_rel"] = chrome.find_element(css, f"{md} a").get_attribute("rel")
        seen["unsafe_text"] = text_of(chrome, f"{md} .link-text")
        seen["markup"] = len(chrome.find_elements(css, "#messages img, #messages script"))
        seen["markup_as_text"] = "<img src=x onerror=alert(1)>" in text_of(chrome, md)
        seen["highlighted"] = len(chrome.find_elements(css, f"{md} .codeblock code span.tok-s"))
        seen["lang"] = text_of(chrome, f"{md} .codeblock .lang")
        copy = chrome.find_element(css, f"{md} .codeblock button.copy")
        seen["copy_label"] = copy.get_attribute("aria-label")
        code = text_of(chrome, f"{md} .codeblock pre code")
        copy.click()
        wait.until(lambda c: copy.get_attribute("data-copied") is not None)
        seen["copied"] = copy.get_attribute("data-copied")
        # What the clipboard holds, read back by pasting it.
        box.click()
        box.send_keys(Keys.CONTROL, "v")
        seen["pasted_is_code"] = box.get_attribute("value") == code
        fill(chrome, "prompt", "")
        seen["box_height"] = box.size["height"]
        chrome.execute_script("document.activeElement.blur()")
        for path in screenshots:
            path.parent.mkdir(parents=True, exist_ok=True)
            assert chrome.save_screenshot(str(path))

        # A reload: the conversation, its settings and its place in the list are all back.
        chrome.refresh()
        wait.until(lambda c: c.find_elements(css, f"{ANSWER} .codeblock"))
        seen["after_reload_user"] = text_of(chrome, "#messages .message.user .content")
        seen["after_reload_received"] = received(chrome)
        seen["after_reload_meta"] = text_of(chrome, f"{ANSWER} .meta")
        seen["after_reload_settings"] = [
            chrome.find_element(By.ID, f).get_attribute("value") for f in ("system", "temperature", "max-tokens")
        ]
        seen["titles"] = [b.text for b in chrome.find_elements(css, "#conversation-list .open")]

        # Regenerate: the last answer is asked for again and replaced, with the same settings.
        chrome.find_element(css, f"{ANSWER} button.regenerate").click()
        wait.until(lambda c: c.find_elements(css, f"{ANSWER}[data-state='streaming']") or True)
        wait_answered(chrome, 1)
        wait.until(lambda c: c.find_elements(css, f"{ANSWER} button.regenerate"))
        seen["regenerated"] = received(chrome)
        seen["regenerate_count"] = len(chrome.find_elements(css, "#messages .message"))

        # A second turn with max tokens blank: none is sent, and the first turn is in the history.
        fill(chrome, "max-tokens", "")
        box = chrome.find_element(By.ID, "prompt")
        box.send_keys("And now?", Keys.ENTER)
        wait_answered(chrome, 2)
        seen["second"] = received(chrome)

        # A new conversation keeps the settings but not the messages; the old one is a click away.
        chrome.find_element(By.ID, "new-chat").click()
        seen["new_messages"] = len(chrome.find_elements(css, "#messages .message"))
        seen["new_system"] = chrome.find_element(By.ID, "system").get_attribute("value")
        chrome.find_element(By.ID, "prompt").send_keys("Second conversation", Keys.ENTER)
        wait_answered(chrome, 1)
        seen["new_received"] = received(chrome)
        seen["titles_two"] = [b.text for b in chrome.find_elements(css, "#conversation-list .open")]
        first = chrome.find_element(css, "#conversation-list li:nth-child(2) .open")
        first.click()
        wait.until(lambda c: len(c.find_elements(css, "#messages .message.assistant")) == 2)
        seen["switched_user"] = text_of(chrome, "#messages .message.user .content")
        seen["current_title"] = text_of(chrome, "#conversation-list li[aria-current='true'] .open")

        # Delete the first conversation (the page asks first); the other one is left, also after a reload.
        chrome.find_element(css, "#conversation-list li[aria-current='true'] .delete").click()
        chrome.switch_to.alert.accept()
        wait.until(lambda c: len(c.find_elements(css, "#conversation-list li")) == 1)
        chrome.refresh()
        wait.until(lambda c: c.find_elements(css, f"{ANSWER} .codeblock"))
        seen["titles_left"] = [b.text for b in chrome.find_elements(css, "#conversation-list .open")]
        seen["left_user"] = text_of(chrome, "#messages .message.user .content")

        # On a phone's width the chat has the screen; the conversations open over it, and close
        # once one is picked.
        chrome.set_window_size(420, 860)
        nav = chrome.find_element(By.ID, "conversations")
        seen["phone_nav_hidden"] = not nav.is_displayed()
        toggle = chrome.find_element(By.ID, "show-conversations")
        toggle.click()
        wait.until(lambda c: nav.is_displayed())
        seen["phone_expanded"] = toggle.get_attribute("aria-expanded")
        chrome.find_element(css, "#conversation-list .open").click()
        wait.until(lambda c: not nav.is_displayed())
        seen["phone_answer_shown"] = chrome.find_element(css, ANSWER).is_displayed()
        seen["errors"] = [e for e in chrome.get_log("browser") if e["level"] == "SEVERE"]
    return seen


async def test_markdown_settings_and_conversations_in_the_page(amqtt: RunningBroker, tmp_path: Path) -> None:
    shots = [tmp_path / "chat-markdown.png"]
    async with swarm_with_gateway(amqtt, tmp_path, *ECHO_ARGS, node=ECHO_NODE) as swarm:
        # (Not the README's picture: that is a real model's answer, from the streaming test.)
        seen = await asyncio.to_thread(markdown_settings_and_conversations, swarm, shots)

    assert "Max tokens must be a whole number" in seen["bad_max"], seen["bad_max"]
    assert seen["sent_when_bad"] == 0
    assert seen["state"] == "done", seen
    # The node was given the system prompt first, the question as typed, and the settings.
    got = seen["received"]
    assert got["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": QUESTION_TEXT},
    ], got
    assert got["max_tokens"] == 300 and got["temperature"] == pytest.approx(0.3), got
    assert f"node {ECHO_NODE}" in seen["meta"] and "tok/s" in seen["meta"] and " ms" in seen["meta"], seen["meta"]
    # The markdown was drawn: heading, emphasis, list, inline code, the web link; the rest as text.
    assert seen["h1"] == "Plan for today" and seen["h1_em"] == "today"
    assert seen["strong"] == "first" and seen["inline_code"] == "rm -rf /"
    assert seen["links"] == ["https://example.com/docs"], seen["links"]
    assert "noopener" in seen["link_rel"]
    assert seen["unsafe_text"] == "click me"
    assert seen["markup"] == 0 and seen["markup_as_text"]
    # The code block: its language, highlighted, with a copy button that copies the code.
    assert seen["lang"] == "json" and seen["highlighted"] > 0
    assert seen["copy_label"] == "Copy code (json)"
    assert seen["copied"] == "true" and seen["pasted_is_code"], seen
    assert seen["box_height"] < 100  # emptied, the message box is one line again
    # After a reload: all of it back.
    assert seen["after_reload_user"] == QUESTION_TEXT
    assert seen["after_reload_received"] == got
    assert seen["after_reload_meta"] == seen["meta"]
    assert seen["after_reload_settings"] == [SYSTEM, "0.3", "300"]
    assert seen["titles"] == ["Plan for *today*"]
    # Regenerate replaced the answer, asked with the same question and settings.
    assert seen["regenerated"] == got and seen["regenerate_count"] == 2
    # Max tokens blank: the page sent none, so the node got the swarm's default, not 300.
    second = seen["second"]
    assert second["max_tokens"] != 300, second
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]
    assert second["messages"][2]["content"].startswith("# Plan for *today*")
    assert second["messages"][3] == {"role": "user", "content": "And now?"}
    # A new conversation: empty, same settings, its own history.
    assert seen["new_messages"] == 0 and seen["new_system"] == SYSTEM
    assert seen["new_received"]["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Second conversation"},
    ]
    assert seen["titles_two"] == ["Second conversation", "Plan for *today*"]
    assert seen["switched_user"] == QUESTION_TEXT and seen["current_title"] == "Plan for *today*"
    assert seen["titles_left"] == ["Second conversation"] and seen["left_user"] == "Second conversation"
    assert seen["phone_nav_hidden"] and seen["phone_expanded"] == "true" and seen["phone_answer_shown"], seen
    assert seen["errors"] == [], seen["errors"]
