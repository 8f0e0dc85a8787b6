"""The page in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

    HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=./data python -m pytest tests/serving/test_page_browser.py -m browser -q

Types a prompt, watches the answer stream in, checks that markup in a prompt stays text, tries batch
and compare modes and the 中文 / English switch, and takes a screenshot into the test's temporary
folder (the tree is left as it was). ``make screenshot`` runs the screenshot test with
``DISTILL_SCREENSHOT=sample_images/distillation.png`` to refresh the README's picture from the
trained v2 student. Without Chromium the tests skip, except under CI (``CI`` set), where they fail
so that a missing browser cannot pass unnoticed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from python3_distillation.generation import Generator
from python3_distillation.paths import model_dir
from python3_distillation.serving.app import create_app

from .helpers import threaded_servers

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT_ENV = "DISTILL_SCREENSHOT"  # where `make screenshot` wants the trained v2's page saved
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
    new_batch = gen.new_batch

    def slowed_batch():
        batch = new_batch()
        step = batch.step

        def slowed_step(*args, **kwargs):
            time.sleep(delay)
            return step(*args, **kwargs)

        batch.step = slowed_step
        return batch

    gen.new_batch = slowed_batch
    return gen


@pytest.fixture(scope="module")
def serve():
    """Start the app on a free port in a thread; every server is shut down at the end."""
    apps = []

    def start(generators: dict[str, Generator]) -> str:
        app = create_app({"batch_window_ms": 2}, generators=generators)
        apps.append(app)
        return serve_app(app)

    with threaded_servers() as serve_app:
        yield start
    for app in apps:
        app.extensions["distill"].close()


@pytest.fixture(scope="module")
def primary(tmp_path_factory) -> tuple[str, Generator]:
    trained = model_dir("v2")
    if (trained / "config.json").is_file():
        gen = Generator.from_pretrained(trained, device="cpu")
        return gen.name, gen
    gen = Generator.from_pretrained(_tiny(tmp_path_factory.mktemp("tiny-random")), device="cpu")
    return "tiny-random", _slowed(gen, 0.01)


def _open(browser, base: str, locale: str = "en-US"):
    page = browser.new_page(viewport={"width": 1280, "height": 900}, locale=locale)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base + "/")
    page.wait_for_selector("#server-state[data-state=ready]", timeout=30_000)
    return page, errors


def _generate(page, timeout: float = 120_000) -> None:
    page.click("#generate")
    page.wait_for_selector("#status[data-state=done], #status[data-state=error]", timeout=timeout)
    assert page.get_attribute("#status", "data-state") == "done", page.text_content("#status")


def test_streams_renders_text_inertly_and_saves_screenshot(browser, serve, primary, tmp_path):
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
    shot = tmp_path / "distillation.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

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


def test_language_follows_the_browser_and_switches(browser, serve, tmp_path_factory):
    gen = _slowed(Generator.from_pretrained(_tiny(tmp_path_factory.mktemp("lang")), device="cpu"), 0.002)
    base = serve({"student": gen})
    page, errors = _open(browser, base, locale="zh-CN")
    assert page.text_content("#generate") == "生成" and page.get_attribute("html", "lang") == "zh-CN"
    assert page.text_content("h1") == "GPT-2 蒸馏" and "参数量" in page.text_content("#model-cards")
    page.fill("#prompt", "Hello")
    page.fill("#max_tokens", "8")
    page.fill("#temperature", "0")
    _generate(page)
    assert page.text_content("#status") == "完成"
    generated = page.text_content("#output .gen")
    page.click("[data-set-lang=en]")
    assert page.text_content("#generate") == "Generate" and page.get_attribute("html", "lang") == "en"
    assert "Parameters" in page.text_content("#model-cards") and page.text_content("h1") == "GPT-2 distillation"
    assert page.text_content("#output .gen") == generated  # generated text is never translated
    page.reload()  # the choice is remembered
    page.wait_for_selector("#server-state[data-state=ready]", timeout=30_000)
    assert page.text_content("#generate") == "Generate"
    assert not errors, errors
    page.close()
    en_page, errors = _open(browser, base, locale="en-GB")
    assert en_page.text_content("#generate") == "Generate"
    en_page.close()


@pytest.mark.skipif(not os.environ.get(SCREENSHOT_ENV), reason=f"set {SCREENSHOT_ENV}=PATH (make screenshot)")
def test_screenshot_of_the_trained_v2(browser, serve):
    """`make screenshot`: the page serving the trained v2 student, saved where DISTILL_SCREENSHOT says."""
    trained = model_dir("v2")
    if not (trained / "config.json").is_file():
        pytest.fail(f"no trained v2 student in {trained}: run `make run` first", pytrace=False)
    gen = Generator.from_pretrained(trained, device="cpu")
    page, errors = _open(browser, serve({gen.name: gen}))
    page.fill("#prompt", PROMPT)
    page.fill("#max_tokens", "48")
    page.fill("#seed", "1")
    _generate(page)
    out = Path(os.environ[SCREENSHOT_ENV])
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out), full_page=True)
    assert not errors, errors
    page.close()
