"""Headless Chromium driven over the DevTools protocol (a websocket), for tests of web pages.

Uses Debian's ``chromium`` (``apt-get install chromium``) and this project's own ``websockets``;
no selenium or playwright. :func:`chromium_path` says why it is missing, for ``pytest.skip``.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import pathlib
import re
import shutil
import subprocess
import time
from typing import Any

from websockets.asyncio.client import connect

__all__ = ["chromium_path", "Browser"]


def chromium_path() -> tuple[str | None, str]:
    """``(path, "")`` or ``(None, why not)``; tries ``apt-get install chromium`` when root."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "no chromium on PATH and not root to `apt-get install chromium`"
    r = subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True, capture_output=True,
                       text=True, timeout=900)
    if path := shutil.which("chromium"):
        return path, ""
    return None, f"`apt-get install chromium` failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"


class Browser:
    """One headless Chromium with one page. ``async with Browser(path, tmp) as b: await b.goto(url)``."""

    def __init__(self, path: str, workdir: pathlib.Path, *, width: int = 1200, height: int = 900) -> None:
        self.path, self.workdir, self.size = path, workdir, (width, height)
        self._ids = itertools.count(1)

    async def __aenter__(self) -> "Browser":
        args = [self.path, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
                "--remote-debugging-port=0", f"--user-data-dir={self.workdir / 'profile'}",
                f"--window-size={self.size[0]},{self.size[1]}", "about:blank"]
        self.log = self.workdir / "chromium.log"
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        url = await self._devtools_url()
        self.ws = await connect(url, max_size=64 << 20)
        target = await self._call("Target.createTarget", url="about:blank")
        attached = await self._call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        self.session = attached["sessionId"]
        await self._call("Page.enable", session=True)
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            await self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    async def _devtools_url(self, timeout: float = 60) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(r"DevTools listening on (ws://\S+)", self.log.read_text())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            await asyncio.sleep(0.1)
        raise RuntimeError(f"chromium did not open its DevTools port in {timeout} s")

    async def _call(self, method: str, *, session: bool = False, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        await self.ws.send(json.dumps(msg))
        while True:  # events and other answers are skipped: one call at a time
            reply = json.loads(await self.ws.recv())
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    async def goto(self, url: str) -> None:
        await self._call("Page.navigate", session=True, url=url)

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        res = await self._call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails'].get('text')}")
        return res["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        """Poll ``expression`` until it is truthy; returns its value. An expression that throws (the
        page is still loading: its elements are not there yet) counts as not yet."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = await self.evaluate(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            await asyncio.sleep(0.25)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; page shows: "
                             f"{await self.evaluate('document.body.innerText')!r}")

    async def screenshot(self, path: pathlib.Path) -> pathlib.Path:
        res = await self._call("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(res["data"]))
        return path
