"""The web chat page, end to end in a real browser: Debian's Chromium driven by Playwright against
the session's real Serve app (tiny model, loopback). The page's answers are checked against the
single-process model's greedy output; screenshots go to ``test-artifacts/web/``."""

from __future__ import annotations

import base64
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from inference_helpers import png

from llava_platform.serve import web

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[3]
ARTIFACTS = REPO / "test-artifacts" / "web"
# What the environment lets a root Chromium do here: no sandbox, no GPU, and no background
# connections to Google's services (this machine's network is closed).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
# Long enough that the answer's events span several reads over the throttled link: with 12 tokens
# (about 2.8 KB of events) the page read the whole answer at once after the tiny preset's tokenizer
# changed, although the server sent one event per token (checked with httpx: 11 events over 35 ms).
MAX_TOKENS = 40
LONG = 1500


def chromium_path() -> str:
    path = os.environ.get("LLAVA_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("Chromium is not installed: `make setup` installs Debian's chromium package "
                    "(or set LLAVA_TEST_CHROMIUM to a Chromium binary)")
    return path


# ---------------------------------------------------------------------------------------------
# The page and its files over plain HTTP
# ---------------------------------------------------------------------------------------------

def test_page_links_its_files_under_the_route_prefix():
    for prefix in ("", "/", "/demo", "/demo/"):
        html = web.page(prefix)
        root = prefix.rstrip("/")
        assert f'src="{root}/static/chat.js"' in html and f'href="{root}/static/chat.css"' in html
        assert f'data-root="{root}"' in html and "{root}" not in html
    assert 'data-root="/a&quot;b"' in web.page('/a"b')  # escaped, never raw markup
    assert web.asset("chat.js")[1].startswith("text/javascript")
    assert web.asset("../gateway.py") is None and web.asset("chat.html") is None


def test_gateway_serves_the_page_with_a_strict_content_policy(serve_app):
    page = httpx.get(f"{serve_app.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    js = httpx.get(f"{serve_app.url}/static/chat.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "/v1/chat/completions" in js.text
    missing = httpx.get(f"{serve_app.url}/static/missing.js")
    assert missing.status_code == 404 and missing.json()["error"]["message"].endswith("no such file")


# ---------------------------------------------------------------------------------------------
# In the browser
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, request):
    """A fresh browser context per test; the console and page errors are collected, and the page as
    it was at the end of the test is saved as a screenshot (pass or fail)."""
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    context.set_default_timeout(60_000)
    pg = context.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}-end.png"))
    context.close()


def shot(pg, name: str) -> None:
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def set_slider(pg, selector: str, value: float) -> None:
    pg.fill(selector, str(value))
    assert float(pg.input_value(selector)) == value


def drop_file(pg, name: str, raw: bytes, mime: str) -> None:
    """Drag and drop a file onto the image drop zone, as a user dragging it from their desktop does."""
    transfer = pg.evaluate_handle(
        """([name, b64, mime]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: mime}));
            return dt;
        }""", [name, base64.b64encode(raw).decode(), mime])
    pg.dispatch_event("#drop", "dragenter", {"dataTransfer": transfer})
    pg.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def record_renders(pg) -> None:
    """Keep every text the newest answer shows while it streams (a MutationObserver in the page)."""
    pg.evaluate("""() => {
        window.__renders = [];
        const log = document.getElementById("log");
        new MutationObserver(() => {
            const answers = log.querySelectorAll(".msg.assistant .text");
            if (answers.length) window.__renders.push(answers[answers.length - 1].textContent);
        }).observe(log, {childList: true, subtree: true, characterData: true});
    }""")


@contextmanager
def slow_network(pg, bytes_per_s: int = 1500):
    cdp = pg.context.new_cdp_session(pg)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                  "downloadThroughput": bytes_per_s, "uploadThroughput": -1})
    try:
        yield
    finally:
        cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                      "downloadThroughput": -1, "uploadThroughput": -1})
        cdp.detach()


def answers(pg) -> list[str]:
    return pg.locator(".msg.assistant[data-state=done] .text").all_text_contents()


def connected_greedy(pg, max_tokens: int = MAX_TOKENS) -> None:
    """Wait until the page shows the model, then set greedy decoding (comparable with the reference)."""
    pg.locator("#model.connected").wait_for()
    set_slider(pg, "#temperature", 0)
    pg.fill("#max-tokens", str(max_tokens))


def open_chat(pg, url: str) -> None:
    pg.goto(url)
    connected_greedy(pg)


def enter_key(pg, key: str) -> None:
    pg.fill("#api-key", key)
    pg.click("#key-form button")


def test_upload_ask_stream_follow_up_regenerate_and_clear(serve_app, page, reference):
    open_chat(page, f"{serve_app.url}/")
    assert page.inner_text("#model") == "llava"
    shot(page, "web-chat-empty")

    image = png("blue", (64, 48), shape="circle")
    drop_file(page, "shape.png", image, "image/png")
    page.locator("#preview-img").wait_for()
    assert page.inner_text("#preview-name") == "shape.png"
    page.fill("#prompt", "What colour is the shape?")
    record_renders(page)
    # A slow link (Chromium's own throttling), so that the answer's events reach the page over time
    # however fast the server and the machine are: the page must show them as they come.
    with slow_network(page):
        page.click("#send")
        page.locator(".msg.assistant[data-state=done]").wait_for()

    first = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}},
        {"type": "text", "text": "What colour is the shape?"}]}]
    expected = reference(first, [image], MAX_TOKENS)
    assert answers(page) == [expected.lstrip()]  # shown without a leading space
    renders = [r for r in page.evaluate("window.__renders") if r]
    assert len(set(renders)) >= 2, f"the answer arrived in one piece, not streamed: {renders}"
    assert all(expected.lstrip().startswith(r) for r in renders)  # each render a prefix of the final answer
    assert page.inner_text(".msg.assistant .meta") == f"stopped at the max output tokens · {MAX_TOKENS} tokens"
    assert page.locator(".msg.user img").count() == 1  # the question shows the image it was asked about
    assert page.locator("#preview").is_hidden() and page.input_value("#prompt") == ""
    shot(page, "web-chat-answer")

    # A follow-up question (Enter sends) continues the conversation: the image stays in turn one, and
    # the first answer goes back to the model exactly as it was generated.
    page.fill("#prompt", "Where is it?")
    page.press("#prompt", "Enter")
    page.locator(".msg.assistant[data-state=done]").nth(1).wait_for()
    second = first + [{"role": "assistant", "content": expected}, {"role": "user", "content": "Where is it?"}]
    follow_up = reference(second, [image], MAX_TOKENS)
    assert answers(page) == [expected.lstrip(), follow_up.lstrip()]
    shot(page, "web-chat-multi-turn")

    # Regenerate replaces the last answer (greedy: the same text again) and keeps the rest.
    page.click("#regenerate")
    page.locator(".msg.assistant[data-state=streaming]").wait_for(state="detached")
    assert answers(page) == [expected.lstrip(), follow_up.lstrip()] and page.locator(".msg.user").count() == 2

    page.click("#clear")
    assert page.locator(".msg").count() == 0 and page.locator("#empty-hint").is_visible()
    assert page.errors == []


def test_a_bad_image_shows_the_api_error_readably_and_loses_nothing(serve_app, page, reference):
    open_chat(page, f"{serve_app.url}/")
    page.set_input_files("#image-input", files=[{"name": "broken.png", "mimeType": "image/png",
                                                 "buffer": b"these bytes are not a PNG"}])
    page.fill("#prompt", "What is in this picture?")
    page.click("#send")
    error = page.locator(".msg.error")
    error.wait_for()
    text = error.inner_text()
    assert text.startswith("The server rejected the request (400 invalid_image):"), text
    assert "not a readable image" in text and "Traceback" not in text and "{" not in text
    assert "Your question is back in the text box." in text
    # Nothing is lost: the question and the image are back in the composer, the failed turn is not
    # in the conversation, and the page goes on working once the image is removed.
    assert page.input_value("#prompt") == "What is in this picture?"
    assert page.inner_text("#preview-name") == "broken.png (the browser cannot show this file)"
    assert page.locator(".msg.user").count() == 0
    shot(page, "web-chat-bad-image")

    page.click("#remove-image")
    page.click("#send")
    page.locator(".msg.assistant[data-state=done]").wait_for()
    assert answers(page) == [reference([{"role": "user", "content": "What is in this picture?"}], [], MAX_TOKENS).lstrip()]

    # An error the browser itself catches: a file that is not an image at all is not sent.
    page.set_input_files("#image-input", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hi"}])
    assert "notes.txt is not an image" in page.locator(".msg.error").last.inner_text()
    assert page.locator("#preview").is_hidden()
    assert page.errors == []


def test_max_tokens_over_the_server_limit_is_explained(serve_app, page):
    open_chat(page, f"{serve_app.url}/")
    page.fill("#max-tokens", "100000")
    page.fill("#prompt", "hello")
    page.click("#send")
    text = page.locator(".msg.error").inner_text()
    assert text.startswith("The server rejected the request (400"), text
    assert "max_tokens" in text and str(serve_app.args.max_new_tokens_limit) in text


@pytest.fixture(scope="module")
def keyed_app(serve_app, tmp_path_factory):
    """A second app on the session's Serve instance, with an API key (from a key file), under a
    route prefix."""
    from ray import serve

    from llava_platform.serve.app import build_app

    secret = "sk-web-" + os.urandom(8).hex()
    key_file = tmp_path_factory.mktemp("webkey") / "api_key"
    key_file.write_text(secret)
    # Long answers allowed, so that Stop lands while the server is still generating.
    args = type(serve_app.args).model_validate({**serve_app.args.model_dump(), "api_key_file": str(key_file),
                                                "max_new_tokens_limit": LONG})
    small = {"ray_actor_options": {"num_cpus": 0.1}, "num_replicas": 1}
    serve.run(build_app(args, {n: small for n in ("Gateway", "VisionEncoder", "LanguageModel")}),
              name="webkey", route_prefix="/webkey")
    yield f"{serve_app.url}/webkey", secret
    serve.delete("webkey")


def test_the_page_asks_for_the_api_key_and_uses_it(keyed_app, page, reference):
    url, secret = keyed_app
    page.goto(url)  # no trailing slash: redirected to /webkey/, its files and API under /webkey
    page.locator("#key-bar").wait_for()
    assert page.inner_text("#model") == "API key needed" and page.is_disabled("#send")
    shot(page, "web-chat-api-key")

    enter_key(page, "sk-wrong")
    page.locator("#status", has_text="the API key was refused").wait_for()
    assert page.locator("#key-bar").is_visible()

    enter_key(page, secret)
    connected_greedy(page)
    assert page.inner_text("#model") == "llava" and page.locator("#key-bar").is_hidden()
    page.fill("#prompt", "hello")
    page.click("#send")
    page.locator(".msg.assistant[data-state=done]").wait_for()
    assert answers(page) == [reference([{"role": "user", "content": "hello"}], [], MAX_TOKENS).lstrip()]
    # The key lives in this tab's session storage only, never in the address.
    assert secret not in page.url
    assert page.evaluate("Object.values(sessionStorage)") == [secret]


def cancelled_rows(app: str) -> int:
    """The LanguageModel's count of rows that left early (one replica), asked from a thread: the
    Playwright sync API runs an event loop in this one, where Serve's blocking calls refuse to run."""
    from ray import serve

    def ask() -> int:
        return serve.get_deployment_handle("LanguageModel", app).stats.remote().result()["cancelled"]

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(ask).result()


def test_stop_ends_the_answer_and_the_server_stops_generating_it(keyed_app, page, reference):
    url, secret = keyed_app
    before = cancelled_rows("webkey")
    page.goto(f"{url}/")
    enter_key(page, secret)
    connected_greedy(page, LONG)
    page.fill("#prompt", "tell me a story")
    page.click("#send")
    # Stop is pressed in the page, on the first frame that shows text. Measured before: Playwright's
    # expect-then-click took long enough (round trips, actionability checks on a page that reflows
    # with every token) that the server had sometimes produced all LONG tokens by then, so the row
    # finished normally ("stopped" shown, `cancelled` still 0): a race in the test, not in the app.
    page.evaluate("""() => new Promise((resolve) => {
        const tick = () => {
            const text = document.querySelector(".msg.assistant[data-state=streaming] .text");
            if (text && /\\S/.test(text.textContent)) { document.getElementById("stop").click(); resolve(); }
            else requestAnimationFrame(tick);
        };
        tick();
    })""")
    page.locator(".msg.assistant[data-state=done]").wait_for()
    shown = answers(page)[0]
    whole = reference([{"role": "user", "content": "tell me a story"}], [], LONG).lstrip()
    assert shown and len(shown) < len(whole) and whole.startswith(shown), (shown, whole)
    assert page.inner_text(".msg.assistant .meta") == "stopped"
    assert page.is_visible("#send") and page.is_hidden("#stop") and page.is_enabled("#regenerate")
    shot(page, "web-chat-stopped")
    # The server noticed the closed stream: the row left the decode batch long before LONG tokens.
    deadline = time.time() + 30
    while cancelled_rows("webkey") == before and time.time() < deadline:
        time.sleep(0.2)
    assert cancelled_rows("webkey") == before + 1
    # The partial answer is part of the conversation: Regenerate replaces it.
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.click("#regenerate")
    page.locator(".msg.assistant[data-state=streaming]").wait_for(state="detached")
    assert answers(page) == [reference([{"role": "user", "content": "tell me a story"}], [], MAX_TOKENS).lstrip()]
