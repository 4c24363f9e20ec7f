"""The study in a real browser: headless Chromium (the distribution's package) driven by Playwright.

One browser for the module (the CPU is shared). Two raters work side by side in separate browser contexts
(separate cookies), then the admin exports the results. Screenshots of the rating page and the results page
are left in `test-artifacts/human_eval/` of the checkout ($HUMAN_EVAL_ARTIFACTS if set).

Without /usr/bin/chromium these tests fail (CI installs it: .ci/run); set HUMAN_EVAL_SKIP_BROWSER=1 to skip
them instead on a machine that cannot have it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from alpacare_jax.eval.human.study import create_study
from tests.eval.human.study_fixtures import (
    STYLES,
    XSS,
    artifacts_dir,
    served,
    style_marker,
    tokens,
    write_outputs,
)

CHROMIUM = Path("/usr/bin/chromium")
MODELS = {"finetuned_run7": "alpacare-secret-model", "baseline_dir": "baseline-secret-model"}
RATING_PNG, RESULTS_PNG = "human_eval_rating_page.png", "human_eval_results_page.png"  # kept as artifacts
pytestmark = pytest.mark.xdist_group("human_eval_browser")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        message = f"the browser tests need {CHROMIUM} (apt-get install chromium; .ci/run installs it)"
        if os.environ.get("HUMAN_EVAL_SKIP_BROWSER") == "1":
            pytest.skip(message + "; skipped: HUMAN_EVAL_SKIP_BROWSER=1")
        pytest.fail(message + ", or set HUMAN_EVAL_SKIP_BROWSER=1 to skip them", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    files = [write_outputs(root / d / f"{d}_answers.json", m, 10, style=s, xss_every=3)
             for (d, m), s in zip(MODELS.items(), STYLES)]
    db_path = root / "study.sqlite"
    create_study(files, db_path, seed=4, raters=2)
    with served(db_path) as url:
        yield url, db_path, tokens(db_path)


class Rater:
    """One rater's browser window; it checks blinding and records every dialog on every page it shows."""

    def __init__(self, browser, url: str, token: str):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.dialogs: list[str] = []
        self.context.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page = self.context.new_page()
        self.invite = f"{url}/login/{token}"
        self.sent: dict[int, tuple[str, str, str]] = {}  # assignment id -> (correctness, helpfulness, comment)

    def sign_in(self) -> None:
        """Open the invite link and press its sign-in button."""
        self.page.goto(self.invite)
        with self.page.expect_navigation():
            self.page.get_by_role("button", name="Start rating").click()

    @property
    def item(self) -> int:
        return int(re.search(r"/rate/(\d+)$", self.page.url).group(1))

    def progress(self) -> str:
        html = self.page.content()
        assert not [m for m in (*MODELS, *MODELS.values()) if m in html]
        return self.page.inner_text("#progress")

    def sides_showing(self, *styles: str) -> list[str]:
        """"A" or "B" for each style: the side whose displayed answer is written in it."""
        a, b = self.page.inner_text("#answer-a"), self.page.inner_text("#answer-b")
        assert all((style_marker(s) in a) != (style_marker(s) in b) for s in styles), (a, b)
        return ["A" if style_marker(s) in a else "B" for s in styles]

    def rate_by_mouse(self, correctness: str, helpfulness: str, comment: str = "") -> None:
        labels = {"A": "A is better", "tie": "Tie", "B": "B is better"}
        item = self.item
        self.page.locator("fieldset").nth(0).get_by_text(labels[correctness]).click()
        self.page.locator("fieldset").nth(1).get_by_text(labels[helpfulness]).click()
        self.page.locator("textarea[name=comment]").fill(comment)
        with self.page.expect_navigation():
            self.page.get_by_role("button", name="Save and continue").click()
        self.sent[item] = (correctness, helpfulness, comment)

    def rate_by_keyboard(self, correctness: str, helpfulness: str) -> None:
        keys = {"A": 0, "tie": 1, "B": 2}
        item = self.item
        self.page.keyboard.press(str(1 + keys[correctness]))
        self.page.keyboard.press(str(4 + keys[helpfulness]))
        with self.page.expect_navigation():
            self.page.keyboard.press("Enter")
        self.sent[item] = (correctness, helpfulness, "")


def _stored(db_path: Path) -> dict[int, tuple]:
    with sqlite3.connect(db_path) as conn:
        return {a: tuple(rest) for a, *rest in conn.execute(
            "SELECT assignment_id, correctness, helpfulness, comment, revisions FROM votes")}


def test_two_raters_rate_revise_resume_and_the_admin_exports(browser, study):
    url, db_path, tok = study
    artifacts = artifacts_dir()
    for name in (RATING_PNG, RESULTS_PNG):
        (artifacts / name).unlink(missing_ok=True)  # a previous run's picture must not pass for this one's
    first, second = Rater(browser, url, tok.raters[0]), Rater(browser, url, tok.raters[1])
    first.sign_in()
    second.sign_in()
    assert first.progress() == "1 / 10" and second.progress() == "1 / 10"

    # Five items with the mouse, the second rater working at the same time. The second rater always prefers
    # the first model's answer for correctness and the second's for helpfulness, on whichever side each is shown.
    prefers = (STYLES[0], STYLES[1])
    for i, (c, h) in enumerate([("A", "A"), ("B", "tie"), ("tie", "B"), ("A", "B"), ("B", "B")]):
        first.rate_by_mouse(c, h, comment=f"mouse {i}")
        if i % 2:
            second.rate_by_mouse(*second.sides_showing(*prefers))
    assert first.progress() == "6 / 10" and second.progress() == "3 / 10"
    # Three with the keyboard.
    for c, h in [("B", "A"), ("A", "tie"), ("tie", "tie")]:
        first.rate_by_keyboard(c, h)
    second.rate_by_keyboard(*second.sides_showing(*prefers))
    assert first.progress() == "9 / 10"

    # Back to the previous item (the keyboard's tie / tie is shown), revise it with the mouse.
    first.page.get_by_role("link", name="Previous").click()
    first.page.wait_for_url(re.compile(r"/rate/\d+$"))
    assert first.progress() == "8 / 10"
    assert first.page.locator("input[name=correctness][value=tie]").is_checked()
    assert first.page.locator("input[name=helpfulness][value=tie]").is_checked()
    revised = first.item
    first.rate_by_mouse("A", "B", comment="revised: A is more accurate")
    assert first.progress() == "9 / 10"  # back to the first unrated item
    first.page.screenshot(path=str(artifacts / RATING_PNG), full_page=True)

    # Close the page and come back: the same browser, then a new one from the invite link.
    resume_at = first.item
    first.page.close()
    second.rate_by_mouse(*second.sides_showing(*prefers))
    first.page = first.context.new_page()
    first.page.goto(url)
    assert first.item == resume_at and first.progress() == "9 / 10"
    fresh = Rater(browser, url, tok.raters[0])
    fresh.sign_in()
    assert fresh.item == resume_at
    fresh.context.close()

    stored = _stored(db_path)
    assert len(stored) == 8 + 4
    assert {a: stored[a][:3] for a in first.sent} == first.sent
    assert {a: stored[a][:3] for a in second.sent} == second.sent
    assert stored[revised][3] == 1 and sum(s[3] for s in stored.values()) == 1

    # Answers that try to run script are shown as text, on every item of the first rater.
    with sqlite3.connect(db_path) as conn:
        items = [a for (a,) in conn.execute("SELECT id FROM assignments WHERE rater_id = 0 ORDER BY position")]
    shown = 0
    for a in items:
        first.page.goto(f"{url}/rate/{a}")
        text = first.page.inner_text("#answer-a") + first.page.inner_text("#answer-b")
        if XSS[0] in text:
            assert XSS[1] in text
            shown += 1
            if shown == 1:
                first.page.screenshot(path=str(artifacts / "human_eval_rating_page_injection.png"), full_page=True)
        assert first.page.locator(".answers script, .answers img").count() == 0
    assert shown == 4  # tasks 0, 3, 6, 9 carry the injection attempts
    assert first.dialogs == [] and second.dialogs == []

    # The admin sees the results and exports them.
    admin = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = admin.new_page()
    page.goto(f"{url}/login/{tok.admin}")
    with page.expect_navigation():
        page.get_by_role("button", name="Open the results").click()
    assert page.url == f"{url}/admin"
    assert "alpacare-secret-model vs baseline-secret-model" in page.inner_text("#comparisons")
    assert "8 / 10" in page.inner_text("#raters") and "4 / 10" in page.inner_text("#raters")
    assert page.locator("#chart").evaluate("img => img.naturalWidth") > 500  # the chart loaded
    page.screenshot(path=str(artifacts / RESULTS_PNG), full_page=True)
    with page.expect_download() as download:
        page.click("#export-csv")
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text(encoding="utf-8"))))
    assert len(rows) == 12
    (row,) = [r for r in rows if r["comment"] == "revised: A is more accurate"]
    assert row["revisions"] == "1" and row["rater"] == "rater-1"
    with page.expect_download() as download:
        page.click("#export-json")
    exported = json.loads(Path(download.value.path()).read_text())
    assert len(exported["votes"]) == 12 and {p["done"] for p in exported["progress"]} == {8, 4}
    # Every vote of the second rater counts for the model whose answer was on the chosen side.
    assert {c for c, _, _ in second.sent.values()} == {"A", "B"}  # both sides were chosen
    assert [(v["correctness"], v["helpfulness"]) for v in exported["votes"] if v["rater"] == "rater-2"] == [
        ("model_1", "model_2")] * 4
    admin.close()
    first.context.close()
    second.context.close()

    for name in (RATING_PNG, RESULTS_PNG):  # whole pages at the 1280 x 900 viewport
        with Image.open(artifacts / name) as image:
            assert image.format == "PNG" and image.width == 1280 and image.height >= 900, (name, image.size)
            colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
            assert colours is None or len(colours) > 50, (name, "a nearly blank picture")
