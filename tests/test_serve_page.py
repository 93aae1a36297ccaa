"""The playground page in a real headless browser: Debian's chromium driven by Playwright's Python API (no
browser download; `make test` installs chromium with apt-get when missing). Skipped without chromium, except
in CI (CI=true), where it must run."""

import os
import re
import shutil
import time

import pytest
from _trained_tiny import trained_tiny_checkpoint
from serve_helpers import LiveServer


def _chromium() -> str:
    found = (
        os.environ.get("DEEPSEEK_LM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    if found:
        return found
    if os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail("no chromium: `make browser` installs Debian's (apt-get install chromium)")
    pytest.skip("no chromium (`make browser` installs it)")


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def server(tmp_path_factory, monkeypatch):
    checkpoint = trained_tiny_checkpoint(tmp_path_factory)
    live = LiveServer(checkpoint, max_batch_size=2)
    live.engine.eos_token_id = None  # streams run to max_tokens unless stopped
    step = live.engine.decoder.step  # ~30 tokens/s, so that text visibly streams and Stop lands mid-answer
    monkeypatch.setattr(live.engine.decoder, "step", lambda *a: time.sleep(0.03) or step(*a))
    yield live
    live.stop()


def test_type_a_prompt_see_it_stream_and_stop_it(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 760})
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny')")
    page.fill("#max-tokens", "200")
    page.fill("#temperature", "0")

    # Shift+Enter is a new line, not a send
    page.click("#prompt")
    page.keyboard.type("The")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("import")
    assert page.input_value("#prompt") == "The\nimport" and page.locator(".turn").count() == 0

    page.keyboard.press("Enter")  # sends
    generated = page.locator(".answer .generated").last
    page.wait_for_function("document.querySelector('.answer .generated').textContent.length > 0")
    first = len(generated.text_content())
    page.wait_for_function(f"document.querySelector('.answer .generated').textContent.length > {first + 5}")
    assert page.is_enabled("#stop") and not page.is_enabled("#send")  # still streaming: text came in pieces
    page.click("#stop")
    stats = page.locator(".answer .stats").last
    page.wait_for_function("document.querySelector('.answer .stats').textContent.includes('stopped')")
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    shown = generated.text_content()
    deadline = time.monotonic() + 10
    while server.engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.stats()["running"] == 0  # the server let the request go
    assert 0 < len(server.engine.tokenizer.encode(shown).ids) < 200 and stats.text_content()

    # chat mode: the question, then the answer streamed under it, with tokens/s once finished
    page.click("#mode-chat")
    page.fill("#max-tokens", "24")
    page.fill("#prompt", "What does a function return?")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('.answer .stats')[0].textContent.includes('tokens/s')")
    assert page.locator(".turn.user .text").text_content() == "What does a function return?"
    assert page.locator(".answer").count() == 1
    shot = os.environ.get("DEEPSEEK_LM_SCREENSHOT") or str(tmp_path / "playground.png")
    page.screenshot(path=shot, full_page=True)
    assert os.path.getsize(shot) > 10_000


def test_a_speculative_server_shows_the_acceptance_under_each_answer(browser, tmp_path_factory):
    from deepseek_lm.generate.speculative_batching import SpeculativeBatchEngine

    checkpoint = trained_tiny_checkpoint(tmp_path_factory)
    live = LiveServer(checkpoint, engine_type=SpeculativeBatchEngine, draft_tokens=2, max_batch_size=2)
    live.engine.eos_token_id = None  # 24 tokens: several rounds
    try:
        page = browser.new_page()
        page.goto(live.url + "/")
        page.wait_for_function(
            "document.getElementById('model').textContent.includes('speculative, 2 draft')"
        )
        page.fill("#max-tokens", "24")
        page.fill("#prompt", "The")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('.answer .stats').textContent.includes('acceptance')")
        stats = page.locator(".answer .stats").text_content()
        accepted, drafted = (
            int(n) for n in re.search(r"acceptance \d+ % \((\d+) of (\d+) drafts\)", stats).groups()
        )
        assert 0 <= accepted <= drafted and drafted % 2 == 0 and "tokens/s" in stats
    finally:
        live.stop()
