"""The search page in a real browser: Debian's headless Chromium driven by Playwright."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from lookalike.client import Client
from tests.unit.service import imagegen

pytestmark = pytest.mark.slow

expect = None  # playwright.sync_api.expect, imported by the fixture (skips without playwright)

CHROMIUM = os.environ.get("LOOKALIKE_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _wait(page, js: str, timeout: float = 20.0) -> None:
    """Poll ``js`` (evaluated over CDP, so the page's strict CSP stays on) until it is true."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(js):
        assert time.monotonic() < deadline, f"timed out waiting for {js}"
        time.sleep(0.05)


@pytest.fixture()
def page(server):
    playwright = pytest.importorskip("playwright.sync_api")
    global expect
    expect = playwright.expect
    if not Path(CHROMIUM).is_file() and not shutil.which(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium chromium-driver)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.goto(server.url + "/")
            yield pg
            assert not errors, errors  # no JavaScript errors
        finally:
            browser.close()


def test_upload_shows_query_beside_a_grid_of_results(page, e2e_images, artifacts_dir):
    root, files = e2e_images
    query = files[5]
    page.wait_for_selector("text=/images indexed/")
    page.set_input_files("[data-testid=file-input]", str(query))
    results = page.locator("[data-testid=result]")
    expect(results).to_have_count(10)
    # the query is shown, the best hit is the query itself with score 1.000 and its label
    assert page.locator("[data-testid=query-image]").is_visible()
    first = results.nth(0)
    assert first.locator("[data-testid=score]").inner_text() == "score 1.000"
    assert first.locator("[data-testid=label]").inner_text() == query.parent.name
    scores = [float(re.search(r"[-\d.]+$", s).group()) for s in page.locator("[data-testid=score]").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    # every result image actually loaded from /v1/images/{id}
    _wait(page, "() => [...document.querySelectorAll('[data-testid=result] img')]"
                ".every(i => i.complete && i.naturalWidth > 0)")
    assert re.match(r"10 results in \d+ ms", page.locator("[data-testid=status]").inner_text())
    assert page.locator("[data-testid=error]").is_hidden()
    shot = artifacts_dir / "service_page.png"
    shot.unlink(missing_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.is_file() and shot.stat().st_size > 10_000

    # clicking a result searches by that indexed image
    second_id = results.nth(1).get_attribute("data-id")
    results.nth(1).locator("[data-testid=open]").click()
    expect(page.locator("[data-testid=query-image]")).to_have_attribute("src", f"/v1/images/{second_id}")
    expect(page.locator("[data-testid=status]")).to_contain_text("10 results")
    assert second_id not in page.locator("[data-testid=result]").evaluate_all("els => els.map(e => e.dataset.id)")


def test_errors_are_shown_in_words(page, artifacts_dir):
    page.set_input_files("[data-testid=file-input]",
                         files=[{"name": "photo.jpg", "mimeType": "image/jpeg", "buffer": imagegen.tiff()}])
    error = page.locator("[data-testid=error]")
    error.wait_for(state="visible")
    assert "This file type is not supported" in error.inner_text() and "TIFF" in error.inner_text()
    assert page.locator("[data-testid=result]").count() == 0
    page.set_input_files("[data-testid=file-input]",
                         files=[{"name": "cut.jpg", "mimeType": "image/jpeg", "buffer": imagegen.truncated_jpeg()}])
    expect(error).to_contain_text("could not be read")
    shot = artifacts_dir / "service_page_error.png"
    page.screenshot(path=str(shot))
    assert shot.is_file()


def test_drag_and_drop(page):
    data = base64.b64encode(imagegen.jpeg(77, (120, 100))).decode()
    page.wait_for_selector("text=/images indexed/")
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
            const zone = document.querySelector('[data-testid=drop-zone]');
            zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: dt, bubbles: true, cancelable: true}));
            zone.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        data,
    )
    expect(page.locator("[data-testid=result]")).to_have_count(10)
    assert page.locator("#query-caption").inner_text() == "dropped.jpg"


def _shown_ids(page) -> list[str]:
    return page.locator("[data-testid=result]").evaluate_all("els => els.map(e => e.dataset.id)")


def test_newest_search_wins_and_an_error_clears_old_results(page, server, e2e_images):
    """Change k (a slow search of the good image), then at once pick a bad file (a fast 415):
    the page shows the bad file's error and no results, also after the slow answer comes."""
    from playwright.sync_api import Error as PlaywrightError

    root, files = e2e_images
    page.wait_for_selector("text=/images indexed/")
    page.set_input_files("[data-testid=file-input]", str(files[5]))
    expect(page.locator("[data-testid=result]")).to_have_count(10)

    held = []  # the k-change search, held back by the test until the bad file's answer is shown

    def hold_first(route) -> None:
        if held:
            route.continue_()
        else:
            held.append(route)

    page.route("**/v1/search", hold_first)
    with page.expect_request("**/v1/search"):
        page.select_option("[data-testid=k-select]", "20")
    page.set_input_files("[data-testid=file-input]",
                         files=[{"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": imagegen.tiff()}])
    error = page.locator("[data-testid=error]")
    expect(error).to_contain_text("This file type is not supported")
    expect(page.locator("[data-testid=result]")).to_have_count(0)
    assert held, "the k-change search was not intercepted"

    # Now the slow search's answer (20 hits for the good image) arrives, late. (Playwright does
    # not see a disk file's bytes in the held request, so the test asks the server itself.)
    with Client(server.url) as api:
        answer = api.search(files[5], k=20)
    assert len(answer.hits) == 20
    route = held[0]
    try:
        route.fulfill(status=200, content_type="application/json", body=json.dumps({
            "results": [dataclasses.asdict(h) for h in answer.hits], "k": answer.k, "offset": answer.offset,
            "model": answer.model, "index": answer.index, "took_ms": answer.took_ms}))
    except PlaywrightError:
        pass  # the page already aborted that request: nothing can arrive
    page.wait_for_timeout(1000)  # time for a late answer to be (wrongly) rendered
    assert _shown_ids(page) == []
    assert error.is_visible() and "This file type is not supported" in error.inner_text()
    assert page.locator("#query-caption").inner_text() == "notes.jpg"


def test_picking_the_same_file_again_searches_again(page, e2e_images):
    root, files = e2e_images
    searches: list[str] = []
    page.on("request", lambda r: searches.append(r.url) if r.url.endswith("/v1/search") else None)
    page.wait_for_selector("text=/images indexed/")
    page.set_input_files("[data-testid=file-input]", str(files[3]))
    results = page.locator("[data-testid=result]")
    expect(results).to_have_count(10)
    first = _shown_ids(page)
    # the input is reset after each pick, so the browser reports the same file as a new choice
    assert page.eval_on_selector("[data-testid=file-input]", "el => el.value") == ""
    page.evaluate("() => document.querySelector('[data-testid=results]').replaceChildren()")
    page.set_input_files("[data-testid=file-input]", str(files[3]))
    expect(results).to_have_count(10)
    assert _shown_ids(page) == first
    assert len(searches) == 2
