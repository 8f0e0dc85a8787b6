"""The page in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python -m pytest tests/test_browser.py -m browser -q

Types a prompt, watches the answer stream in, checks that markup in a prompt stays text, tries batch
and compare modes, and saves ``sample_images/distillation.png`` (the trained v2 student when it
exists, else a tiny random model). Without Chromium the tests skip, except under CI (``CI`` set),
where they fail so that a missing browser cannot pass unnoticed.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from python3_distillation.generate import Generator
from python3_distillation.paths import model_dir
from python3_distillation.server import create_app

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = REPO / "sample_images" / "distillation.png"
PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must install it (apt-get install -y chromium)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def _tiny(path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from python3_distillation.tokenizer import load_tokenizer

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=256, vocab_size=50257)).save_pretrained(path)
    load_tokenizer("gpt2").save_pretrained(path)
    return path


def _slowed(gen: Generator, delay: float) -> Generator:
    """A random tiny model answers in milliseconds; pace its events so the streaming is visible."""
    inner = gen.stream_batch

    def stream_batch(*args, **kwargs):
        for event in inner(*args, **kwargs):
            time.sleep(delay)
            yield event

    gen.stream_batch = stream_batch
    return gen


@pytest.fixture(scope="module")
def serve():
    """Start the app on a free port in a thread; every server is shut down at the end."""
    from werkzeug.serving import make_server

    servers = []

    def start(generators: dict[str, Generator]) -> str:
        app = create_app({"batch_window_ms": 2}, generators=generators)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = make_server("127.0.0.1", port, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture(scope="module")
def primary(tmp_path_factory) -> tuple[str, Generator]:
    trained = model_dir("v2")
    if (trained / "config.json").is_file():
        gen = Generator.from_pretrained(trained, device="cpu")
        return gen.name, gen
    gen = Generator.from_pretrained(_tiny(tmp_path_factory.mktemp("tiny-random")), device="cpu")
    return "tiny-random", _slowed(gen, 0.01)


def _open(browser, base: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base + "/")
    page.wait_for_selector("#server-state[data-state=ready]", timeout=30_000)
    return page, errors


def _generate(page, timeout: float = 120_000) -> None:
    page.click("#generate")
    page.wait_for_selector("#status[data-state=done], #status[data-state=error]", timeout=timeout)
    assert page.get_attribute("#status", "data-state") == "done", page.text_content("#status")


def test_streams_renders_text_inertly_and_saves_screenshot(browser, serve, primary):
    name, gen = primary
    page, errors = _open(browser, serve({name: gen}))
    assert name in page.text_content("#model-cards")

    page.evaluate("""() => {
        window.__seen = [];
        new MutationObserver(() => {
            const g = document.querySelector('#output .gen');
            window.__seen.push([performance.now(), g ? g.textContent.length : 0]);
        }).observe(document.getElementById('output'), {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#prompt", PROMPT)
    page.fill("#max_tokens", "48")
    page.fill("#seed", "1")
    _generate(page)
    seen = page.evaluate("window.__seen")
    grown = [(t, n) for t, n in seen if n > 0]
    assert len({n for _, n in grown}) >= 2, f"text did not grow step by step: {seen}"
    assert grown[-1][0] > grown[0][0], "all the text arrived at once"
    result = page.text_content("#output .result")
    assert result.startswith(PROMPT) and len(result) > len(PROMPT)
    assert "tok/s" in page.text_content("#output .column-stats")
    assert "tok/s" in page.text_content(".model-card .speed")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    page.fill("#prompt", XSS)
    page.fill("#max_tokens", "8")
    _generate(page)
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.evaluate("document.querySelectorAll('#output script, #output img').length") == 0
    assert page.text_content("#output .prompt") == XSS
    assert not errors, errors
    page.close()


def test_batch_and_compare_modes(browser, serve, tmp_path_factory):
    a = _slowed(Generator.from_pretrained(_tiny(tmp_path_factory.mktemp("a")), device="cpu"), 0.002)
    b = _slowed(Generator.from_pretrained(_tiny(tmp_path_factory.mktemp("b")), device="cpu"), 0.002)
    page, errors = _open(browser, serve({"student-a": a, "student-b": b}))
    assert page.is_visible("#compare-wrap")
    page.check("#batch")
    page.check("#compare")
    page.fill("#prompt", "First prompt\nSecond prompt\n")
    page.fill("#max_tokens", "6")
    _generate(page)
    columns = page.query_selector_all("#output .column")
    assert [c.query_selector(".column-model").text_content() for c in columns] == ["student-a", "student-b"]
    for column in columns:
        prompts = [r.text_content() for r in column.query_selector_all(".prompt")]
        assert prompts == ["First prompt", "Second prompt"]
        assert all(g.text_content() for g in column.query_selector_all(".gen"))

    page.fill("#prompt", "word " * 300)  # too long for the context: the API's 422 is shown
    page.uncheck("#batch")
    page.click("#generate")
    page.wait_for_selector("#status[data-state=error]", timeout=30_000)
    assert "422" in page.text_content("#status")
    assert not errors, errors
    page.close()
