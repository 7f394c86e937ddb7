"""The page at ``/`` in a real browser (Playwright driving Debian's Chromium): a digit image dropped on it ranks its
digit first, the labels are editable, an audio clip shows its transcript with segment times."""

from __future__ import annotations

import base64
import contextlib
import shutil
from pathlib import Path

import httpx
import pytest

import mmformer
from tests.test_serve import DIGITS, MODEL, ROOT, lm_dir, running_server, test_samples  # noqa: F401 (a fixture)

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and Path(p).exists()), None)


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed"
    else:
        if CHROMIUM is not None:
            return sync_playwright
        reason = "no Chromium at /usr/bin/chromium (.ci/run installs Debian's chromium with apt-get)"
    print(f"skipping the browser test: {reason}")
    pytest.skip(reason)


def test_page_ranks_a_dropped_digit_and_transcribes_audio():
    sync_playwright = _browser_or_skip()
    image = next(r for r in test_samples(40) if r["digits"] == "5")  # a single handwritten five
    clip = test_samples(3)[2]
    model = mmformer.load_pretrained(str(ROOT / MODEL))
    transcript = model.transcribe([str(DIGITS / clip["audio_filepath"])])[0]
    with running_server(MODEL) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready=true]")
            five = ("five.png", (DIGITS / image["image"]).read_bytes(), "image/png")
            drop(page, *five)
            page.wait_for_selector("#bars li")
            assert page.get_attribute("#bars li:first-child", "data-label") == "five"
            assert len(page.query_selector_all("#bars li")) == 10
            page.wait_for_selector("#caption-row:not([hidden])")
            assert page.text_content("#caption") == model.caption([str(DIGITS / image["image"])])[0]
            page.fill("#labels", "two, five, nine")  # editable labels: the bars follow them
            page.dispatch_event("#labels", "change")
            page.wait_for_function("document.querySelectorAll('#bars li').length === 3")
            assert page.get_attribute("#bars li:first-child", "data-label") == "five"
            page.set_input_files("#file", str(DIGITS / clip["audio_filepath"]))
            page.wait_for_selector("#transcript-row:not([hidden])")
            assert page.text_content("#transcript") == transcript
            cells = [c.text_content() for c in page.query_selector_all("#segments td")]
            assert cells[0] == "0.00 s" and cells[2] == transcript
            assert page.is_hidden("#prompt-panel")  # the digits model is no language model
            assert page.text_content("#error") == "" and not errors
            assert page.is_visible("#labels") and page.get_attribute("#file", "accept") == "image/*,audio/*"
            only_latest_file_shows(page, five)
            assert not errors
            audio_only_page(browser.new_page(), url, five)
        finally:
            browser.close()


def drop(page, name: str, content: bytes, kind: str) -> None:
    """Drop a file named ``name`` on the page's drop zone."""
    transfer = page.evaluate_handle(
        """([name, data, kind]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: kind }));
            return dt;
        }""",
        [name, base64.b64encode(content).decode(), kind],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def only_latest_file_shows(page, image: tuple[str, bytes, str]) -> None:
    """An audio clip's transcription held back while a newer image is dropped, then let through: the page shows the
    image's results only (the older answer used to unhide its transcript beside them)."""
    from playwright.sync_api import Error

    held = []
    page.route("**/v1/audio/transcriptions", lambda route: held.append(route))
    page.set_input_files("#file", str(DIGITS / test_samples(1)[0]["audio_filepath"]))
    while not held:
        page.wait_for_timeout(20)
    drop(page, *image)
    page.wait_for_selector("#caption-row:not([hidden])")
    with contextlib.suppress(Error):  # the page aborted it when the image came
        held[0].continue_()
    page.wait_for_timeout(1000)  # an answer let through arrives in ~0.1 s
    assert page.is_hidden("#transcript-row") and page.get_attribute("#bars li:first-child", "data-label") == "five"
    assert page.text_content("#error") == ""
    page.unroute("**/v1/audio/transcriptions")


def audio_only_page(page, url: str, image: tuple[str, bytes, str]) -> None:
    """The page of a server whose model reads audio only (a Whisper checkpoint: transcriptions only): no labels or
    templates, and a dropped image or text file gets an error naming what the model takes."""
    health = {**httpx.get(url + "/health").json(), "routes": ["/v1/audio/transcriptions"], "modalities": ["audio",
              "text"]}  # fmt: skip
    page.route("**/health", lambda route: route.fulfill(json=health))
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]")
    assert page.is_visible("#drop") and page.is_hidden("#labels") and page.is_hidden("#templates")
    assert page.text_content("#drop-what") == "an audio file" and page.get_attribute("#file", "accept") == "audio/*"
    drop(page, *image)
    page.wait_for_function("document.body.dataset.state === 'done'")
    assert page.text_content("#error") == "five.png: this model cannot take an image file; it takes audio files"
    page.evaluate("delete document.body.dataset.state")
    drop(page, "notes.txt", b"hello, not media", "text/plain")
    page.wait_for_function("document.body.dataset.state === 'done'")
    assert page.text_content("#error") == "notes.txt: not an image or audio file; it takes audio files"
    assert page.is_hidden("#transcript-row") and not page.query_selector_all("#bars li")


@pytest.mark.slow
def test_page_completes_a_prompt_with_a_language_model(lm_dir):  # noqa: F811 (the imported fixture)
    sync_playwright = _browser_or_skip()
    model = mmformer.load_pretrained(str(lm_dir))
    expected = model.complete(["once upon a time"], max_new_tokens=12, do_sample=False)[0]
    with running_server(str(lm_dir)) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready=true]")
            assert page.is_hidden("#media-panel") and page.is_visible("#prompt-panel")
            page.fill("#prompt", "once upon a time")
            page.fill("#max-tokens", "12")
            page.click("#complete")
            page.wait_for_function("document.getElementById('completion').textContent.startsWith('once upon')")
            assert page.text_content("#completion") == "once upon a time" + expected
        finally:
            browser.close()
