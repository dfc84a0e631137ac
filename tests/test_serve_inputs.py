"""Serving inputs: the image policy of decode_image, the classifier deployment's own logic, and
the served app over HTTP — bad input refused with its 4xx, V2 through tritonclient, the API key.

Unit tests need no Ray; the ``integration`` ones share the session's ``served_app``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import struct
import zlib

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, PngImagePlugin
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError

from carclf.bundle import load_bundle
from carclf.data.transforms import eval_resize_crop, load_image
from carclf.errors import UserInputError
from carclf.inference import OnnxClassifier
from carclf.metrics import softmax
from serve.calls import remote
from serve.deployments import EXPLAIN_CHUNK, ClassifierDeployment, ExplainerDeployment
from serve.errors import ApiError, clean_message, host_allowed
from serve.images import MAX_ASPECT, decode_image
from serve.settings import IngressSettings

from .conftest import SERVE_KEY

# --- images -------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(w: int = 48, h: int = 40, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims ``w``×``h`` gray pixels but carries almost no data: a bomb's header."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def corrupt_png() -> bytes:
    """A valid signature and IHDR, then an IDAT full of garbage."""
    data = bytearray(encode(noise(), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start + 10 : start + 400] = bytes(range(256)) + bytes(134)
    return bytes(data)


def png_with_text(size: int, compressed: bool) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * size, zip=compressed)
    return encode(noise(), "PNG", pnginfo=info)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return encode(noise(60, 30), "JPEG", exif=exif.tobytes())


def sixteen_bit_png() -> bytes:
    return encode(Image.fromarray(np.full((30, 40), 40000, np.uint16)), "PNG")


JPEG = encode(noise(), "JPEG")

# --- decode_image, no Ray -----------------------------------------------------------------

VALID = {
    "jpeg": (JPEG, (48, 40)),
    "grayscale": (encode(noise(mode="L"), "PNG"), (48, 40)),
    "cmyk jpeg": (encode(noise(mode="CMYK"), "JPEG"), (48, 40)),
    "16-bit png": (sixteen_bit_png(), (40, 30)),
    "exif rotated": (exif_rotated_jpeg(), (30, 60)),
    "gray with alpha": (encode(noise(mode="LA"), "PNG"), (48, 40)),
    "palette": (encode(noise(mode="P"), "PNG"), (48, 40)),
    "webp": (encode(noise(), "WEBP"), (48, 40)),
    "animated gif (first frame)": (animated_gif(), (32, 32)),
    "10:1 aspect": (encode(noise(400, 40), "PNG"), (400, 40)),
}

INVALID = {
    "empty": (b"", "empty image"),
    "not an image": (b"hello, world" * 10, "not a JPEG, PNG, WebP or GIF"),
    "bmp (format not accepted)": (encode(noise(), "BMP"), "not a JPEG, PNG, WebP or GIF"),
    "truncated jpeg": (JPEG[: len(JPEG) // 2], "invalid image: image file is truncated"),
    "png corrupt after header": (corrupt_png(), "invalid image"),
    "decompression bomb": (png_header_only(50_000, 50_000), "decompression bomb"),
    "over the pixel limit": (png_header_only(8_000, 8_000), "image too large"),
    "huge png text chunk": (png_with_text(2_000_000, False), "metadata too large"),
    "compressed text bomb": (png_with_text(50_000_000, True), "metadata too large"),
    "1x1": (encode(Image.new("RGB", (1, 1)), "PNG"), "image too small"),
    "extreme aspect ratio": (encode(noise(2000, 40), "PNG"), f"over {MAX_ASPECT:.0f}:1"),
}


@pytest.mark.parametrize("case", VALID)
def test_valid_images_decode_to_upright_rgb(case: str) -> None:
    data, size = VALID[case]
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == size


def test_animated_gif_is_its_first_frame() -> None:
    assert decode_image(animated_gif()).getpixel((5, 5)) == (255, 0, 0)


def test_sixteen_bit_keeps_its_brightness() -> None:
    assert decode_image(sixteen_bit_png()).getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256


@pytest.mark.parametrize("case", INVALID)
def test_invalid_images_are_a_400_that_says_why(case: str) -> None:
    data, reason = INVALID[case]
    with pytest.raises(ApiError) as err:
        decode_image(data)
    assert err.value.status == 400
    assert reason in err.value.message


# --- the classifier deployment's own logic, no Ray ----------------------------------------


@pytest.fixture(scope="module")
def classifier(served_bundle) -> ClassifierDeployment:
    return ClassifierDeployment.func_or_class(str(served_bundle.path))


def test_classifier_reports_its_provider_and_passes_its_health_check(classifier) -> None:
    assert classifier.metadata()["provider"] == "CPUExecutionProvider"
    classifier.check_health()  # raises if the model cannot infer


def test_reconfigure_changes_batch_size_and_wait(classifier) -> None:
    classifier.reconfigure({"max_batch_size": 3, "batch_wait_timeout_s": 0.5})
    assert classifier.batching() == {"max_batch_size": 3, "batch_wait_timeout_s": 0.5}
    classifier.reconfigure({})  # back to the CPU defaults
    assert classifier.batching() == {"max_batch_size": 8, "batch_wait_timeout_s": 0.0}


@pytest.fixture()
def warm_bundle(served_bundle, tmp_path):
    """The served bundle with temperature 2, so raw and calibrated logits differ."""
    path = shutil.copytree(served_bundle.path, tmp_path / "bundle")
    meta = json.loads((path / "bundle.json").read_text())
    meta["temperature"] = 2.0
    (path / "bundle.json").write_text(json.dumps(meta))
    return load_bundle(path)


def test_v2_logits_are_the_models_own_and_probabilities_calibrated(warm_bundle) -> None:
    deployment = ClassifierDeployment.func_or_class(str(warm_bundle.path))
    meta = deployment.metadata()
    assert meta["temperature"] == 2.0 and meta["provider"] == "CPUExecutionProvider"
    images = [load_image(encode(noise(seed=s), "PNG")) for s in range(3)]
    batch = OnnxClassifier(warm_bundle).preprocess(images)
    session = ort.InferenceSession(str(warm_bundle.onnx_path), providers=["CPUExecutionProvider"])
    (raw,) = session.run(["logits"], {"input": batch})  # model.onnx itself, in process

    async def unbatched(x: np.ndarray) -> np.ndarray:  # @serve.batch needs a replica
        return deployment.clf.raw_logits(x[None])[0]

    deployment._batched = unbatched
    out = asyncio.run(deployment.infer(batch))
    np.testing.assert_allclose(out["logits"], raw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["probabilities"], softmax(raw / 2.0), rtol=1e-5, atol=1e-7)
    pred = asyncio.run(deployment.predict(batch[0], 3))
    assert pred["score"] == pytest.approx(float(softmax(raw / 2.0)[0].max()), rel=1e-5)


def test_explainer_deployment_serialises_concurrent_requests(served_bundle) -> None:
    """The deployment's own path (worker threads, chunks) under concurrency, without Ray."""
    deployment = ExplainerDeployment.func_or_class(str(served_bundle.path))
    crop = eval_resize_crop(served_bundle.info.preprocess)  # what the ingress sends: crops
    images = [load_image(encode(noise(seed=s), "PNG")) for s in range(EXPLAIN_CHUNK + 2)]
    images = np.stack([np.asarray(crop(img)) for img in images])
    jobs = [("gradcam", None), ("gradcam++", 1), ("gradcam", 2)]

    async def explain_all() -> list[list[dict]]:
        return await asyncio.gather(*(deployment.explain(images, m, t) for m, t in jobs * 4))

    sequential = {job: asyncio.run(deployment.explain(images, *job)) for job in jobs}
    for job, got in zip(jobs * 4, asyncio.run(explain_all()), strict=True):
        assert got == sequential[job], job  # the PNGs too, byte for byte
    assert len(sequential[jobs[0]]) == len(images)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8000", True),
        ("localhost", True),
        ("LOCALHOST:8000", True),
        ("[::1]:8000", True),
        ("10.0.0.5:8000", True),  # the address the request arrived on
        ("evil.example", False),
        ("127.0.0.1.evil.example", False),
        ("localhost.", False),
        ("[::1", False),
        ("", False),
        (None, False),  # absent or repeated
    ],
)
def test_host_allow_list(host: str | None, allowed: bool) -> None:
    defaults = IngressSettings().allowed_hosts
    assert host_allowed(host, "10.0.0.5", defaults) is allowed


def test_host_allow_list_patterns() -> None:
    assert host_allowed("api.cars.example:443", None, ["*.cars.example"])
    assert not host_allowed("cars.example.evil", None, ["*.cars.example"])
    assert host_allowed("anything.example", None, ["*"])
    assert not host_allowed(None, "127.0.0.1", ["*"])


def test_clean_message_strips_colour_and_control_characters() -> None:
    raw = "\x1b[36mray::ServeReplica:carclf:explainer\x1b[39m boom\r\nTraceback (most recent"
    assert clean_message(raw) == "ray::ServeReplica:carclf:explainer boom"
    assert clean_message("a\tb\x00c" + "x" * 400).startswith("a b c")
    assert len(clean_message("x" * 400)) == 300


# --- over HTTP (integration) --------------------------------------------------------------

AUTH = {"x-api-key": SERVE_KEY}


def post(url: str, body: bytes, kind: str | None, path: str = "/v1/models/body:predict"):
    headers = {**AUTH, **({"content-type": kind} if kind else {})}
    return httpx.post(url + path, content=body, headers=headers, timeout=60)


@pytest.mark.integration
def test_bad_input_gets_its_4xx_and_the_app_keeps_serving(served_app: str) -> None:
    url = served_app
    b64 = base64.b64encode(JPEG).decode()
    cases = [(case, data, "image/png", 400) for case, (data, _) in INVALID.items()]
    cases += [
        ("no content type", JPEG, None, 415),
        ("wrong content type", JPEG, "text/plain", 415),
        ("malformed json", b"{not json", "application/json", 422),
        ("json without instances", b'{"x": 1}', "application/json", 422),
        (
            "malformed base64",
            json.dumps({"instances": [{"image_b64": "%%%"}]}).encode(),
            "application/json",
            422,
        ),
        ("over the body limit", b"\xff" * (10 * 1024 * 1024 + 1), "image/jpeg", 413),
    ]
    for case, body, kind, status in cases:
        r = post(url, body, kind)
        assert r.status_code == status, (case, r.text)
        assert r.json()["error"], case
    chunked = httpx.post(
        f"{url}/v1/models/body:predict",
        content=iter([b"\xff" * (6 * 1024 * 1024)] * 2),  # no content-length: counted as read
        headers={**AUTH, "content-type": "image/jpeg"},
        timeout=60,
    )
    assert chunked.status_code == 413
    assert post(url, JPEG, "image/jpeg", "/v1/models/nope:predict").status_code == 404
    for target, status in [("tank", 422), ("99", 422), ("-1", 422), ("0", 200)]:
        payload = {"instances": [{"image_b64": b64}], "target": target}
        r = httpx.post(f"{url}/v1/models/body:explain", json=payload, headers=AUTH, timeout=60)
        assert r.status_code == status, (target, r.text)

    def tensor(name: str, shape: list[int], datatype: str, data: list) -> bytes:
        spec = {"name": name, "shape": shape, "datatype": datatype, "data": data}
        return json.dumps({"inputs": [spec]}).encode()

    v2_cases = [
        (b"{not json", 422),
        (tensor("x", [1], "FP32", [1]), 422),
        (tensor("input", [1, 3, 2, 2], "FP32", [0.0] * 12), 422),  # not the model's size
        (tensor("input", [1], "BYTES", [base64.b64encode(b"junk").decode()]), 400),
    ]
    for body, status in v2_cases:
        r = httpx.post(f"{url}/v2/models/body/infer", content=body, headers=AUTH, timeout=60)
        assert r.status_code == status, (body[:60], r.text)
    for case, (data, _) in VALID.items():
        r = post(url, data, "image/png")
        assert r.status_code == 200, (case, r.text)
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200


@pytest.mark.integration
def test_tritonclient_gets_onnxruntime_probabilities(served_app: str, served_bundle) -> None:
    import tritonclient.http as tc

    client = tc.InferenceServerClient(served_app.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("body", headers=AUTH)
    meta = client.get_model_metadata("body", headers=AUTH)
    size = list(served_bundle.info.input_size)
    assert meta["inputs"][0]["shape"] == [-1, *size]

    encoded = [encode(noise(64 + 16 * s, 48, seed=s), "JPEG") for s in range(3)]
    reference = OnnxClassifier(load_bundle(served_bundle.path))
    images = [load_image(data) for data in encoded]
    batch = reference.preprocess(images)
    expected = reference.probabilities(images)
    own = reference.raw_logits(batch)  # V2 logits are the model's own, not divided by T
    for binary in (True, False):
        fp32 = tc.InferInput("input", list(batch.shape), "FP32")
        fp32.set_data_from_numpy(batch, binary_data=binary)
        raw = tc.InferInput("input", [len(encoded)], "BYTES")
        if binary:
            raw.set_data_from_numpy(np.array(encoded, dtype=object))
        else:  # JSON carries BYTES elements as base64 strings
            b64 = [base64.b64encode(e).decode() for e in encoded]
            raw.set_data_from_numpy(np.array(b64, dtype=object), binary_data=False)
        outputs = [
            tc.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "probabilities")
        ]
        for tensor in (fp32, raw):
            # once at tritonclient's defaults (no outputs named: all in binary), once explicit
            for requested in (None, outputs):
                # a fresh dict: tritonclient writes its own headers into the one it is given
                result = client.infer("body", [tensor], outputs=requested, headers=dict(AUTH))
                probs = result.as_numpy("probabilities")
                np.testing.assert_allclose(probs, expected, atol=1e-5)
                np.testing.assert_allclose(result.as_numpy("logits"), own, rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_api_key_guards_every_endpoint_but_health(served_app: str) -> None:
    url = served_app
    guarded = [
        ("GET", "/v1/models"),
        ("POST", "/v1/models/body:predict"),
        ("POST", "/v1/models/body:explain"),
        ("POST", "/v1/analyze"),
        ("GET", "/v2"),
        ("GET", "/v2/models/body"),
        ("GET", "/v2/models/body/ready"),
        ("POST", "/v2/models/body/infer"),
        ("POST", "/v1/models/nope:predict"),  # 401, not 404: no probing for model names
        ("GET", "/v2/models/nope"),
    ]
    for headers in ({}, {"x-api-key": "wrong"}, {"x-api-key": "s3cret-test-kéy".encode("latin-1")}):
        for method, path in guarded:
            r = httpx.request(method, url + path, headers=headers, content=JPEG, timeout=30)
            assert r.status_code == 401, (method, path, headers, r.text)
    for path in ("/v2/health/live", "/v2/health/ready", "/"):
        assert httpx.get(url + path).status_code == 200
    r = httpx.get(f"{url}/v1/models", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"models": ["body"]}


def _remote(exc: BaseException) -> ApiError:
    """What the ingress makes of a deployment call that raised ``exc``."""

    async def failing() -> None:
        raise exc

    retry = {"retry-after": "1"}
    with pytest.raises(ApiError) as err:
        asyncio.run(remote(failing(), "the explainer of 'body'", retry))
    return err.value


def test_deployment_errors_come_back_in_the_clients_terms() -> None:
    busy = _remote(BackPressureError(num_queued_requests=8, max_queued_requests=8))
    assert (busy.status, busy.headers) == (503, {"retry-after": "1"})
    assert busy.message == "the explainer of 'body' is busy; retry shortly"
    died = _remote(ActorDiedError())
    assert died.status == 503 and "restarting" in died.message and died.headers
    traceback = "\x1b[36mray::ServeReplica:carclf:explainer-body.explain()\x1b[39m\nTraceback"
    wrapped = RayTaskError("explain", traceback, UserInputError("target: unknown class 'x'"))
    bad = _remote(wrapped.as_instanceof_cause())
    assert (bad.status, bad.message) == (422, "target: unknown class 'x'")
