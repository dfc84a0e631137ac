"""The chaos suite's hostile inputs: requests a good server answers with a 4xx, staying ready.

Each case is a whole raw request (:mod:`bench.loadclient` can send what polite clients cannot:
a repeated key header, a lying ``Content-Length``, another ``Host``), sent on its own
connection and followed by a readiness check.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

from bench.loadclient import Target, exchange, get_request, json_post
from bench.overload import PROBES

NESTED = b"[" * 100_000 + b"]" * 100_000  # JSON nested deeper than any parser's recursion


def hostile_cases(
    target: Target, image: bytes, input_size: list[int], max_images: int, max_body_bytes: int
) -> list[tuple[str, bytes]]:
    """The hostile-input list: (name, raw request). A good server answers each with a 4xx.

    Args:
        target: the server and model.
        image: a valid encoded image, for the cases where only one field is hostile.
        input_size: the model's ``[C, H, W]``, for the NaN tensor.
        max_images: the server's images-per-request cap (one more is sent).
        max_body_bytes: the server's body cap (a Content-Length one over it is declared).
    """
    b64 = base64.b64encode(image).decode()
    return [
        *_v1_cases(target, b64),
        *_v2_cases(target, b64, input_size),
        *_request_cases(target, b64, max_images, max_body_bytes),
    ]


async def run_hostile(
    target: Target, cases: list[tuple[str, bytes]], timeout_s: float = 30.0
) -> list[dict[str, Any]]:
    """Each case in turn: its status and time, then the status of ``/v2/health/ready``."""
    rows = []
    for name, raw in cases:
        reply = await exchange(target.port, raw, timeout_s)
        ready = await exchange(target.port, get_request(target, PROBES["ready"]), timeout_s)
        try:
            error = json.loads(reply.body).get("error", "") if reply.body else reply.error
        except (ValueError, AttributeError):
            error = reply.body[:80].decode("latin-1")  # not JSON: recorded as it came
        rows.append(
            {
                "case": name,
                "status": reply.status,
                "ms": reply.seconds * 1000,
                "ready_after": ready.status,
                "error": " ".join(str(error).replace("|", "/").split())[:100],
            }
        )
    return rows


def _v1_cases(target: Target, b64: str) -> list[tuple[str, bytes]]:
    predict, explain = f"/v1/models/{target.model}:predict", f"/v1/models/{target.model}:explain"
    inst = json.dumps({"instances": [{"image_b64": b64}]}).encode()[:-1]  # without its "}"
    cases = [
        ("V1 JSON nested 100,000 deep", b'{"instances": ' + NESTED + b"}"),
        ("top_k 1e999", inst + b', "top_k": 1e999}'),
        ("top_k of 5000 digits", inst + b', "top_k": ' + b"9" * 5000 + b"}"),
    ]
    out = [(name, json_post(target, predict, body)) for name, body in cases]
    for t in ("²", [], {}, -1, 1_000_000_000, "nope"):
        body = json.dumps({"instances": [{"image_b64": b64}], "target": t}).encode()
        name = f"explain target {json.dumps(t, ensure_ascii=False)}"
        out.append((name, json_post(target, explain, body)))
    return out


def _v2_body(b64: str, shape: list, datatype: str = "BYTES", data: list | None = None) -> bytes:
    spec = {"name": "input", "shape": shape, "datatype": datatype, "data": data or [b64]}
    return json.dumps({"inputs": [spec]}).encode()


def _v2_cases(target: Target, b64: str, input_size: list[int]) -> list[tuple[str, bytes]]:
    zeros = _v2_body(b64, [1, *input_size], "FP32", [0.0] * int(np.prod(input_size)))
    cases = [
        ("V2 JSON nested 100,000 deep", b'{"inputs": ' + NESTED + b"}"),
        ("V2 BYTES shape [2^63-1, 2^63-1]", _v2_body(b64, [2**63 - 1, 2**63 - 1])),
        ("V2 BYTES shape [2^64]", _v2_body(b64, [2**64])),
        ("V2 BYTES shape of 100 dimensions", _v2_body(b64, [1] * 100)),
        ("V2 BYTES shape [true]", _v2_body(b64, [True])),
        ("V2 FP32 input with a NaN", zeros.replace(b"0.0", b"NaN", 1)),
    ]
    infer = f"/v2/models/{target.model}/infer"
    return [(name, json_post(target, infer, body)) for name, body in cases]


def _request_cases(
    target: Target, b64: str, max_images: int, max_body_bytes: int
) -> list[tuple[str, bytes]]:
    predict = f"/v1/models/{target.model}:predict"
    one = json.dumps({"instances": [{"image_b64": b64}]}).encode()
    many = json.dumps({"instances": [{"image_b64": b64}] * (max_images + 1)}).encode()
    keys = [("x-api-key", target.key or "none"), ("x-api-key", "wrong")]
    return [
        ("duplicate x-api-key", json_post(target, predict, one, headers=keys)),
        ("bad Host", json_post(target, predict, one, host="evil.example")),
        (
            "declared Content-Length over the cap",
            json_post(target, predict, b"{", content_length=max_body_bytes + 1),
        ),
        (f"{max_images + 1} images (cap {max_images})", json_post(target, predict, many)),
    ]
