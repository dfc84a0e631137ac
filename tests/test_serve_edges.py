"""The served app at its edges (issue 14): hostile inputs, request caps, auth and Host checks,
raw V2 logits, and Grad-CAM under concurrent explains — all over HTTP against the session's
``served_app``, as a client sees them.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from carclf.bundle import load_bundle
from carclf.data.transforms import load_image
from carclf.inference import OnnxClassifier
from carclf.metrics import softmax

from .conftest import SERVE_KEY, SERVE_PORT
from .test_serve_inputs import JPEG, encode, noise

pytestmark = pytest.mark.integration
AUTH = {"x-api-key": SERVE_KEY}
B64 = base64.b64encode(JPEG).decode()
NESTED = b"[" * 100_000 + b"]" * 100_000


def assert_clean(r: httpx.Response, status: int, case: object) -> None:
    """The status, and a one-line JSON error with nothing of Ray's or the terminal's in it."""
    assert r.status_code == status, (case, r.status_code, r.text[:300])
    message = r.json()["error"]
    assert message and "\n" not in message and "\x1b" not in message, (case, message)
    for internal in ("ray::", "Ray", "Traceback", "ServeReplica", 'File "'):
        assert internal not in message, (case, message)


def no_constant(name: str) -> None:
    raise AssertionError(f"{name} in a JSON response")


def post_json(url: str, path: str, payload: bytes | dict, **headers: str) -> httpx.Response:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {**AUTH, "content-type": "application/json", **headers}
    return httpx.post(url + path, content=body, headers=headers, timeout=60)


def v2_body(shape: list, datatype: str = "BYTES", data: list | None = None) -> bytes:
    spec = {"name": "input", "shape": shape, "datatype": datatype, "data": data or [B64]}
    return json.dumps({"inputs": [spec]}).encode()


def test_hostile_v1_inputs_get_a_clean_4xx(served_app: str) -> None:
    url = served_app
    predict, explain = "/v1/models/body:predict", "/v1/models/body:explain"
    inst = f'{{"instances": [{{"image_b64": "{B64}"}}]'.encode()
    cases = [
        (predict, b'{"instances": ' + NESTED + b"}", 422),
        (predict, inst + b', "top_k": 1e999}', 422),
        (predict, inst + b', "top_k": ' + b"9" * 5000 + b"}", 422),
        (predict, inst + b', "top_k": true}', 422),
        (predict, inst + b', "top_k": NaN}', 422),
        (explain, inst + b', "method": [[[[[]]]]]}', 422),
    ]
    for target in ("²", [], {}, -1, 1_000_000_000, "nope", "-1", 1.5):
        cases.append((explain, {"instances": [{"image_b64": B64}], "target": target}, 422))
    for path, body, status in cases:
        assert_clean(post_json(url, path, body), status, (path, str(body)[:80]))
    for target in ("²", "[]", "{}", "-1", "1000000000", "nope"):
        r = httpx.post(
            url + explain,
            files={"file": ("car.jpg", JPEG, "image/jpeg")},
            data={"target": target},
            headers=AUTH,
            timeout=60,
        )
        assert_clean(r, 422, ("multipart", target))
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200


def test_hostile_v2_inputs_get_a_clean_4xx(served_app: str, served_bundle) -> None:
    url, infer = served_app, "/v2/models/body/infer"
    size = list(served_bundle.info.input_size)
    count = int(np.prod(size))
    cases = [
        (b'{"inputs": ' + NESTED + b"}", 422),
        (v2_body([2**63 - 1, 2**63 - 1]), 413),  # declares more images than the cap
        (v2_body([1, 2**63 - 1]), 422),
        (v2_body([2**64]), 413),
        (v2_body([1] * 100), 422),
        (v2_body([True]), 422),
        (v2_body([33], data=[B64] * 33), 413),
        (v2_body([1, *size], "FP32", [0.0] * count).replace(b"0.0", b"NaN", 1), 422),
        (v2_body([1, *size], "FP32", [1e999]), 422),  # json.dumps writes Infinity
    ]
    for body, status in cases:
        assert_clean(post_json(url, infer, body), status, body[:80])
    # binary FP32 with a NaN in it
    batch = np.zeros([1, *size], np.float32)
    batch[0, 0, 0, 0] = np.nan
    spec = {"name": "input", "shape": [1, *size], "datatype": "FP32"}
    spec["parameters"] = {"binary_data_size": batch.nbytes}
    header = json.dumps({"inputs": [spec]}).encode()
    r = httpx.post(
        url + infer,
        content=header + batch.tobytes(),
        headers={**AUTH, "inference-header-content-length": str(len(header))},
        timeout=60,
    )
    assert_clean(r, 422, "binary NaN")
    # finite but extreme input: a clean answer either way, and JSON without NaN literals
    r = post_json(url, infer, v2_body([1, *size], "FP32", [3e38] * count))
    assert r.status_code in (200, 422), r.text[:200]
    json.loads(r.text, parse_constant=no_constant)  # strict JSON: no NaN or Infinity literal
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200


def test_images_per_request_are_capped(served_app: str) -> None:
    tiny = base64.b64encode(encode(noise(16, 16), "PNG")).decode()
    r = post_json(served_app, "/v1/models/body:predict", {"instances": [{"image_b64": tiny}] * 33})
    assert_clean(r, 413, "33 images")
    assert "at most 32" in r.json()["error"]
    r = post_json(served_app, "/v1/models/body:predict", {"instances": [{"image_b64": tiny}] * 32})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 32


def test_declared_oversize_body_is_refused_before_it_is_sent() -> None:
    """A 300 MB Content-Length gets its 413 after the headers, and the server then closes the
    connection rather than read the body (whichever front: uvicorn says `connection: close`,
    HAProxy just closes)."""
    head = (
        "POST /v1/models/body:predict HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{SERVE_PORT}\r\nx-api-key: {SERVE_KEY}\r\n"
        "Content-Type: image/jpeg\r\nContent-Length: 300000000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", SERVE_PORT), timeout=30) as sock:
        sock.sendall(head.encode() + b"\xff" * 1024)
        start, reply = time.monotonic(), b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        sent = 0
        # Broken pipe or reset: the rest is not read (a stall would be a timeout instead).
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            while sent < 300_000_000:
                sock.sendall(b"\xff" * 65536)
                sent += 65536
    assert sent < 64_000_000, sent  # what socket buffers hold, not the body
    assert time.monotonic() - start < 30


def test_auth_edges(served_app: str) -> None:
    url = served_app
    for pair in ((SERVE_KEY, "wrong"), ("wrong", SERVE_KEY), (SERVE_KEY, SERVE_KEY)):
        headers = [("x-api-key", pair[0]), ("x-api-key", pair[1])]
        r = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
        assert_clean(r, 401, pair)
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert_clean(httpx.get(url + path, timeout=30), 401, path)
        assert httpx.get(url + path, headers=AUTH, timeout=30).status_code == 200, path
    spec = httpx.get(f"{url}/openapi.json", headers=AUTH, timeout=30).json()
    assert "/v1/models/{name}:predict" in spec["paths"] and "/docs" not in spec["paths"]


def test_host_allow_list(served_app: str) -> None:
    url = served_app
    for host in ("evil.example", f"evil.example:{SERVE_PORT}", "127.0.0.1.nip.io"):
        for path in ("/v1/models", "/v2/health/ready", "/"):
            r = httpx.get(url + path, headers={**AUTH, "host": host}, timeout=30)
            assert_clean(r, 421, (host, path))
    for host in (f"localhost:{SERVE_PORT}", "127.0.0.1", f"127.0.0.1:{SERVE_PORT}"):
        r = httpx.get(f"{url}/v1/models", headers={**AUTH, "host": host}, timeout=30)
        assert r.status_code == 200, (host, r.text)


def test_v2_logits_are_the_onnx_models_and_metadata_names_provider(
    served_app: str, served_bundle
) -> None:
    bundle = load_bundle(served_bundle.path)
    temperature = bundle.info.temperature
    meta = httpx.get(f"{served_app}/v2/models/body", headers=AUTH, timeout=30).json()
    assert meta["parameters"] == {
        "execution_provider": "CPUExecutionProvider",
        "temperature": temperature,
    }
    reference = OnnxClassifier(bundle)
    images = [load_image(encode(noise(40, 48, seed=s), "PNG")) for s in range(2)]
    batch = reference.preprocess(images)
    raw = reference.session.run(["logits"], {"input": batch})[0]  # model.onnx in process
    spec = {"name": "input", "shape": list(batch.shape), "datatype": "FP32"}
    spec["data"] = batch.ravel().tolist()
    r = post_json(served_app, "/v2/models/body/infer", {"inputs": [spec]})
    assert r.status_code == 200, r.text[:200]
    out = {
        o["name"]: np.array(o["data"], np.float32).reshape(o["shape"]) for o in r.json()["outputs"]
    }
    np.testing.assert_allclose(out["logits"], raw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["probabilities"], softmax(raw / temperature), atol=1e-6)


def test_concurrent_explains_equal_the_sequential_ones(served_app: str) -> None:
    """Four clients explaining the same images at once get exactly the sequential heatmaps."""
    images = [base64.b64encode(encode(noise(48, 40, seed=s), "PNG")).decode() for s in range(3)]
    jobs = [("gradcam", None), ("gradcam++", 1), ("layercam", 3)]

    def explain(job: tuple[str, int | None]) -> list[dict]:
        payload = {"instances": [{"image_b64": b} for b in images], "method": job[0]}
        if job[1] is not None:
            payload["target"] = job[1]
        r = post_json(served_app, "/v1/models/body:explain", payload)
        assert r.status_code == 200, (job, r.text[:200])
        return r.json()["explanations"]

    sequential = {job: explain(job) for job in jobs}
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(explain, jobs * 4))
    for job, got in zip(jobs * 4, results, strict=True):
        assert got == sequential[job], job  # heatmap and overlay PNGs, byte for byte


def test_explain_flood_gets_fast_503s_and_predictions_keep_flowing(served_app: str) -> None:
    """The explainer is its own bounded pool: past its slots and queue a 503 with Retry-After,
    while predictions beside the flood are all answered."""
    tiny = base64.b64encode(encode(noise(24, 24), "PNG")).decode()
    explain = {"instances": [{"image_b64": tiny}] * 32}
    predict = {"instances": [{"image_b64": tiny}]}

    def call(path: str, payload: dict) -> httpx.Response:
        return post_json(served_app, path, payload)

    # Each of the two ingress replicas works on at most 8 explains (a quarter of its 32 slots)
    # in front of the explainer's 2: 40 at once overflow that whatever the split, and the
    # predictions still find slots.
    with ThreadPoolExecutor(max_workers=48) as pool:
        floods = [pool.submit(call, "/v1/models/body:explain", explain) for _ in range(40)]
        preds = [pool.submit(call, "/v1/models/body:predict", predict) for _ in range(8)]
        flood = [f.result() for f in floods]
        answers = [f.result() for f in preds]
    statuses = sorted(r.status_code for r in flood)
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    for r in flood:
        if r.status_code == 503:
            assert_clean(r, 503, "flood")
            assert r.headers["retry-after"] == "1"
    assert [r.status_code for r in answers] == [200] * len(answers), [r.text for r in answers]
    assert httpx.get(f"{served_app}/v2/health/ready").status_code == 200
