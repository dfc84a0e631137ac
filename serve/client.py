"""HTTP client helpers for the carclf Serve app: wait until ready, one predict and explain.

Used by ``carclf demo``, the tests and the serving benchmark: they speak to the app only over
HTTP, as any client does (docs/ARCHITECTURE.md, "HTTP API").
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import httpx


def wait_ready(url: str, timeout_s: float = 180.0) -> None:
    """Poll ``/v2/health/ready`` until the app answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the Serve app at {url} did not become ready in {timeout_s:.0f} s")


def query(url: str, model: str, image: Path, out: Path) -> dict[str, Any]:
    """One predict and one explain request for ``image``; saves the returned overlay PNG."""
    data = image.read_bytes()
    headers = {"content-type": "image/jpeg"}
    pred = httpx.post(f"{url}/v1/models/{model}:predict", content=data, headers=headers, timeout=60)
    pred.raise_for_status()
    payload = {"instances": [{"image_b64": base64.b64encode(data).decode()}], "method": "gradcam"}
    expl = httpx.post(f"{url}/v1/models/{model}:explain", json=payload, timeout=120)
    expl.raise_for_status()
    explanation = expl.json()["explanations"][0]
    out.write_bytes(base64.b64decode(explanation["overlay_png_b64"]))
    return {"prediction": pred.json()["predictions"][0], "explanation": explanation}
