"""A headless Chromium driven over the Chrome DevTools Protocol, for tests of static HTML pages.

Speaks CDP directly through websocket-client (no selenium, no playwright): start the browser,
open file:// pages, click, type, evaluate JavaScript, take screenshots, and collect every error
the page reports (console errors, uncaught exceptions, failed loads) in ``Browser.errors``.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import websocket

TIMEOUT = 30.0
# websocket-client (the dev extra) is imported when a browser starts, so a test module can
# import this one and say itself what is missing.
HAS_DRIVER = importlib.util.find_spec("websocket") is not None


def _find_chromium() -> str | None:
    if env := os.environ.get("SAE_FAST_CHROMIUM"):
        return env
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


CHROMIUM: str | None = _find_chromium()
# CI sets SAE_FAST_REQUIRE_BROWSER=1: there a missing browser or driver fails, so a skipped
# check never reads as a passing one.
REQUIRED = os.environ.get("SAE_FAST_REQUIRE_BROWSER") == "1"


def require_browser() -> None:
    """Skip the calling test module when Chromium or websocket-client is missing (fail
    instead under SAE_FAST_REQUIRE_BROWSER=1)."""
    import pytest

    missing = []
    if CHROMIUM is None:
        missing.append("no Chromium found: install chromium or set SAE_FAST_CHROMIUM")
    if not HAS_DRIVER:
        missing.append("websocket-client is not installed (the dev extra)")
    if missing and REQUIRED:
        pytest.fail(f"SAE_FAST_REQUIRE_BROWSER=1 but {'; '.join(missing)}")
    if missing:
        pytest.skip("; ".join(missing))


_FLAGS = (
    "--headless=new",
    # Containers and CI runners usually lack the user namespaces the sandbox needs.
    "--no-sandbox",
    "--disable-gpu",
    # /dev/shm is often tiny in containers; without this the renderer can crash on big pages.
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    # Port 0: the browser picks a free port and prints it, so parallel tests never collide.
    "--remote-debugging-port=0",
    "--window-size=1280,900",
)
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


class BrowserError(RuntimeError):
    """The browser failed to start, a CDP command failed or timed out, or page code threw."""


class Browser:
    """``with Browser() as b:`` a headless Chromium showing one page; see the module docstring."""

    def __init__(self, executable: str | None = None) -> None:
        self.executable = executable or CHROMIUM
        self.errors: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._profile: str | None = None
        self._ws: websocket.WebSocket | None = None
        self._next_id = 0
        # Events not yet consumed by a wait: a load event can arrive before navigate's reply.
        self._events: deque[dict[str, Any]] = deque()
        self._stderr: deque[str] = deque(maxlen=40)
        self._ws_url: str | None = None
        self._listening = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Browser:
        if self.executable is None:
            raise BrowserError("no Chromium found: install chromium or set SAE_FAST_CHROMIUM")
        self._profile = tempfile.mkdtemp(prefix="sae_fast_chromium_")
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self) -> None:
        args = [self.executable, *_FLAGS, f"--user-data-dir={self._profile}", "about:blank"]
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # Its own process group, so close() can reap the renderer and helper children too.
            start_new_session=True,
        )
        # Drain stderr for the whole run: a full pipe would block the browser.
        threading.Thread(target=self._read_stderr, daemon=True).start()
        if not self._listening.wait(TIMEOUT) or self._ws_url is None:
            try:  # stderr closed early means the browser is exiting: report how it ended
                why = f"exited with code {self._proc.wait(1)}"
            except subprocess.TimeoutExpired:
                why = f"still running after {TIMEOUT:.0f} s"
            raise BrowserError(
                f"{self.executable} printed no 'DevTools listening on' line ({why});"
                f" stderr tail:\n{self._stderr_tail()}"
            )
        port = int(re.match(r"ws://[^:/]+:(\d+)/", self._ws_url).group(1))
        page_url = self._page_ws_url(port)
        import websocket

        # suppress_origin: Chromium rejects websocket handshakes with an Origin it does not allow.
        self._ws = websocket.create_connection(page_url, timeout=TIMEOUT, suppress_origin=True)
        for domain in ("Page", "Runtime", "Log"):
            self._send(f"{domain}.enable")

    def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for raw in self._proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self._stderr.append(line)
            if self._ws_url is None and (m := _LISTENING.search(line)):
                self._ws_url = m.group(1)
                self._listening.set()
        self._listening.set()  # the browser exited: wake _start so it fails at once

    def _stderr_tail(self) -> str:
        return "\n".join(self._stderr) or "(empty)"

    def _page_ws_url(self, port: int) -> str:
        # The about:blank page target can show up a moment after the browser socket does.
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    targets = json.load(r)
            except OSError:
                targets = []
            for target in targets:
                if target.get("type") == "page" and "webSocketDebuggerUrl" in target:
                    return target["webSocketDebuggerUrl"]
            if time.monotonic() > deadline:
                raise BrowserError(f"no page target on port {port}: {targets!r}")
            time.sleep(0.1)

    def close(self) -> None:
        """Close the socket, stop the browser (SIGTERM, SIGKILL after 5 s), remove the profile."""
        if self._ws is not None:
            # A dead browser may have dropped the socket already.
            with contextlib.suppress(Exception):
                self._ws.close()
            self._ws = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(5)
            # Helpers (zygote, crashpad) can outlive the main process; the group is ours alone.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc = None
        if self._profile is not None:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    # -- protocol ----------------------------------------------------------------------------

    def _recv(self, deadline: float, what: str) -> dict[str, Any]:
        import websocket

        assert self._ws is not None, "Browser used outside its with block"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BrowserError(f"timed out after {TIMEOUT:.0f} s waiting for {what}")
        self._ws.settimeout(remaining)
        try:
            message = json.loads(self._ws.recv())
        except websocket.WebSocketTimeoutException:
            raise BrowserError(f"timed out after {TIMEOUT:.0f} s waiting for {what}") from None
        except (websocket.WebSocketConnectionClosedException, OSError) as e:
            raise BrowserError(
                f"lost the browser while waiting for {what}: {e}; stderr tail:\n"
                f"{self._stderr_tail()}"
            ) from None
        if "method" in message:
            self._record(message)
            self._events.append(message)
        return message

    def _send(self, method: str, **params: Any) -> dict[str, Any]:
        """Run one CDP command and return its result; events that arrive meanwhile are kept."""
        assert self._ws is not None, "Browser used outside its with block"
        self._next_id += 1
        ident = self._next_id
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + TIMEOUT
        while True:
            message = self._recv(deadline, f"the reply to {method}")
            if message.get("id") != ident:
                continue
            if "error" in message:
                raise BrowserError(f"{method} failed: {message['error']}")
            return message.get("result", {})

    def _wait_event(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            while self._events:
                event = self._events.popleft()
                if event["method"] == method:
                    return event.get("params", {})
            self._recv(deadline, method)

    def _record(self, event: dict[str, Any]) -> None:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = params.get("args", [])
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in args)
            self.errors.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.errors.append(f"uncaught: {text}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            url = f" ({entry['url']})" if entry.get("url") else ""
            self.errors.append(f"{entry.get('source', 'log')}: {entry.get('text', '')}{url}")

    # -- page actions ------------------------------------------------------------------------

    def open(self, path: Path | str) -> None:
        """Show a local HTML file and wait for its load event; forget the last page's errors."""
        self.errors.clear()
        self._events.clear()  # a stale load event must not end this wait early
        url = Path(path).resolve().as_uri()
        result = self._send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"Page.navigate to {url} failed: {result['errorText']}")
        self._wait_event("Page.loadEventFired")

    def eval(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression (awaited if a promise); raises if it throws."""
        result = self._send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text", "")
            raise BrowserError(f"JavaScript threw: {text}\nin: {expression}")
        return result.get("result", {}).get("value")

    def click(self, selector: str) -> None:
        """Click the first element matching a CSS selector, then let the page settle."""
        found = self.eval(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
            " if (!el) return false; el.click(); return true; })()"
        )
        if not found:
            raise BrowserError(f"no element matches {selector!r}")
        self.settle()

    def type(self, selector: str, text: str) -> None:
        """Set an input's value and fire input and change as a user's typing would."""
        found = self.eval(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
            " if (!el) return false; el.focus();"
            f" el.value = {json.dumps(text)};"
            " el.dispatchEvent(new Event('input', {bubbles: true}));"
            " el.dispatchEvent(new Event('change', {bubbles: true}));"
            " return true; })()"
        )
        if not found:
            raise BrowserError(f"no element matches {selector!r}")
        self.settle()

    def settle(self) -> None:
        """Wait for a frame and a macrotask: handlers, timers set to 0 and rendering have run."""
        self.eval("new Promise(r => requestAnimationFrame(() => setTimeout(r, 0)))")

    def screenshot(self, path: Path | str, full_page: bool = True) -> Path:
        """Write a PNG of the viewport, or of the whole scrollable document; return its path."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self._send("Page.getLayoutMetrics")["cssContentSize"]
            params["captureBeyondViewport"] = True
            params["clip"] = {
                "x": 0,
                "y": 0,
                "width": size["width"],
                "height": size["height"],
                "scale": 1,
            }
        data = self._send("Page.captureScreenshot", **params)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
