"""The HTML leaderboard in a real headless Chromium: sort by clicking a header, filter by
method / model / experiment, state from the URL hash, published systems marked.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
JSON messages separated by NUL bytes on file descriptors 3 and 4), so no Python
dependency is needed. The test skips only when no Chromium binary exists
(``.ci/run`` installs one)."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from harness.report import build_table, to_html

EM = "lm_eval/tiny_gen/exact_match"
WR = "alpaca_eval/win_rate"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def chromium_binary() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


class Browser:
    """A headless Chromium with one page, spoken to over the DevTools pipe."""

    def __init__(self, binary: str, profile: Path, timeout: float = 60.0):
        self.timeout = timeout
        to_child_r, self._w = os.pipe()     # we write commands; Chromium reads fd 3
        self._r, from_child_w = os.pipe()   # Chromium writes fd 4; we read
        # the child's ends far above 4 first, so that placing them on 3 and 4 cannot overwrite one another
        to_child_r, from_child_w = (self._high(fd) for fd in (to_child_r, from_child_w))
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
                f"--user-data-dir={profile}", "--window-size=1400,900", "--remote-debugging-pipe", "about:blank"]

        def pipes_on_3_and_4():  # in the child, before exec; pass_fds keeps 3 and 4 open
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self.proc = subprocess.Popen(args, pass_fds=(3, 4), preexec_fn=pipes_on_3_and_4, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self.session: str | None = None
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")

    @staticmethod
    def _high(fd: int) -> int:
        import fcntl

        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 32)
        os.close(fd)
        return high

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from Chromium")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the DevTools pipe (exit code {self.proc.poll()})")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if self.session is not None and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def open(self, url: str) -> None:
        """A fresh load of ``url`` (never a same-document hash change)."""
        self.call("Page.navigate", {"url": "about:blank"})
        deadline = time.monotonic() + self.timeout
        while self.js("location.href") != "about:blank":
            if time.monotonic() > deadline:
                raise TimeoutError("about:blank did not load")
            time.sleep(0.05)
        self.call("Page.navigate", {"url": url})
        deadline = time.monotonic() + self.timeout
        while self.js("document.readyState") != "complete" or not self.js("!!document.getElementById('board')"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not load")
            time.sleep(0.05)

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) in the middle of the element."""
        box = self.js(f"(function(){{var e=document.querySelector({json.dumps(selector)});e.scrollIntoView();"
                      "var r=e.getBoundingClientRect();return [r.left+r.width/2, r.top+r.height/2];})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left",
                                                   "clickCount": 1})

    def choose(self, select_id: str, value: str) -> None:
        """Pick an option of a <select> as a user would (value set, change event fired)."""
        self.js(f"(function(){{var s=document.getElementById({json.dumps(select_id)});s.focus();"
                f"s.value={json.dumps(value)};s.dispatchEvent(new Event('change',{{bubbles:true}}));}})()")

    def visible_rows(self) -> list[list[str]]:
        """(experiment, method, model, iteration) of the rows a reader sees, top to bottom."""
        return self.js("Array.from(document.querySelectorAll('#board tbody tr'))"
                       ".filter(function(r){return r.getClientRects().length > 0;})"
                       ".map(function(r){return Array.from(r.cells).slice(0, 4).map(function(c){"
                       "return c.getAttribute('data-s') !== null ? c.getAttribute('data-s') : c.textContent;});})")

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._r)
        os.close(self._w)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium binary (apt-get install chromium); .ci/run installs it")
    b = Browser(binary, tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def _row(exp, method, it, metrics, model=None):
    return {"experiment": exp, "method": method, "iteration": it, "metrics": metrics, "model": model,
            "provenance": {"config_hash": "c0ffee00", "seed": 0, "git_commit": "0123456789", "git_dirty": False,
                           "versions": {"torch": "2.13.0", "transformers": "5.23.0", "trl": "1.16"}}}


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    rows = [
        _row("tiny-spin", "spin", 0, {EM: 0.25, WR: 50.0, "alpaca_eval/n_total": 100, "alpaca_eval/coverage": 1.0},
             "tiny"),
        _row("tiny-spin", "spin", 1, {EM: 0.375, WR: 56.25, "alpaca_eval/n_total": 100, "alpaca_eval/coverage": 1.0},
             "tiny"),
        _row("smol-dno", "dno", 0, {EM: 0.5, WR: 30.0, "alpaca_eval/n_total": 90, "alpaca_eval/coverage": 0.9},
             "smollm2"),
        _row("smol-dno", "dno", 1, {EM: 0.125, WR: 71.5, "alpaca_eval/n_total": 100, "alpaca_eval/coverage": 1.0},
             "smollm2"),
        {"experiment": "gemma-7b-it", "method": "published", "iteration": 0,
         "metrics": {WR: 6.94, "alpaca_eval/standard_error": 0.8, "alpaca_eval/n_total": 805,
                     "alpaca_eval/coverage": 1.0}},
    ]
    out = tmp_path_factory.mktemp("board") / "leaderboard.html"
    to_html(build_table([load_rows_row(r) for r in rows]), out)
    return out


def load_rows_row(r: dict) -> dict:
    """A row as load_rows returns it (validated, with its source)."""
    from harness.report.rows import _check_row

    return _check_row(r, "test:1")


def test_page_is_self_contained(page):
    text = page.read_text(encoding="utf-8")
    assert "<script>" in text and "<style>" in text
    assert "http://" not in text and "https://" not in text and "<link" not in text and " src=\"http" not in text


def test_sort_and_filter_in_a_real_browser(browser, page):
    url = page.as_uri()
    browser.open(url)
    assert browser.visible_rows() == [["smol-dno", "dno", "smollm2", "0"], ["smol-dno", "dno", "smollm2", "1"],
                                      ["tiny-spin", "spin", "tiny", "0"], ["tiny-spin", "spin", "tiny", "1"],
                                      ["gemma-7b-it", "published", "gemma-7b-it", "0"]]
    assert browser.js("document.getElementById('count').textContent") == "5 of 5 rows"

    # the published system is marked
    marked = browser.js("Array.from(document.querySelectorAll('#board tbody tr.published'))"
                        ".map(function(r){return r.cells[0].getAttribute('data-s') + '|' + r.cells[0].textContent})")
    assert marked == ["gemma-7b-it|gemma-7b-itAlpacaEval"]

    # click the win-rate header: highest first; click again: lowest first
    header = f'th[data-name="{WR}"]'
    browser.click(header)
    wins = lambda: [r[0] + "/" + r[3] for r in browser.visible_rows()]  # noqa: E731
    assert wins() == ["smol-dno/1", "tiny-spin/1", "tiny-spin/0", "smol-dno/0", "gemma-7b-it/0"]
    assert browser.js(f"document.querySelector('{header}').getAttribute('aria-sort')") == "descending"
    browser.click(header)
    assert wins() == ["gemma-7b-it/0", "smol-dno/0", "tiny-spin/0", "tiny-spin/1", "smol-dno/1"]
    assert "sort=alpaca_eval%2Fwin_rate" in browser.js("location.hash") and "order=asc" in browser.js("location.hash")

    # a text column sorts alphabetically
    browser.click('th[data-name="experiment"]')
    assert [r[0] for r in browser.visible_rows()] == ["gemma-7b-it", "smol-dno", "smol-dno", "tiny-spin", "tiny-spin"]

    # filters: method, then model, then experiment; the sort is kept
    browser.click(header)  # win rate, highest first again
    browser.choose("f-method", "spin")
    assert wins() == ["tiny-spin/1", "tiny-spin/0"]
    assert browser.js("document.getElementById('count').textContent") == "2 of 5 rows"
    browser.choose("f-method", "")
    browser.choose("f-model", "smollm2")
    assert wins() == ["smol-dno/1", "smol-dno/0"]
    browser.choose("f-model", "")
    browser.choose("f-experiment", "gemma-7b-it")
    assert wins() == ["gemma-7b-it/0"]
    browser.choose("f-experiment", "")
    assert len(browser.visible_rows()) == 5

    # the state in the URL hash: a link opens the page sorted and filtered
    browser.open(url + "#sort=exact_match&order=desc&model=tiny")
    assert browser.visible_rows() == [["tiny-spin", "spin", "tiny", "1"], ["tiny-spin", "spin", "tiny", "0"]]
    assert browser.js("document.getElementById('f-model').value") == "tiny"
    browser.open(url + "#sort=" + "lm_eval%2Ftiny_gen%2Fexact_match" + "&order=asc")
    # missing values (the published system has no exact match) sort last in either direction
    assert [r[0] + "/" + r[3] for r in browser.visible_rows()] == [
        "smol-dno/1", "tiny-spin/0", "tiny-spin/1", "smol-dno/0", "gemma-7b-it/0"]
