"""What one request may make the ingress decode (issue 30, item 3): the decoded-pixel budgets
of a request and of a replica, read from the images' headers and refused before any decode;
Pillow's PNG text limits; the format allow-list on every open; the explainer given the crop.

All without Ray: an ingress instance is built directly, with stand-in model handles, and its
routes are called with hand-made requests.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import threading
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile, PngImagePlugin
from pydantic import ValidationError
from starlette.requests import Request

import serve.images
from serve.admission import Admission
from serve.errors import ApiError, install_handlers
from serve.images import FORMATS, MAX_TEXT_BYTES, decode_image
from serve.ingress import Ingress
from serve.settings import IngressSettings

PRE = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.875}
MP40 = (8000, 5000)  # 40 M pixels, the per-image cap


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def one_bit_png(w: int, h: int, after_pixels: bytes = b"") -> bytes:
    """A valid 1-bit grayscale PNG of ``w``×``h`` black pixels (40 MP is about 5 KB), with
    ``after_pixels`` (chunks) between its image data and its end."""
    rows = (b"\0" + b"\0" * ((w + 7) // 8)) * h  # filter byte + packed bits per row
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + after_pixels
        + chunk(b"IEND", b"")
    )


def ztxt(key: bytes, size: int) -> bytes:
    """A zTXt chunk that decompresses to ``size`` bytes (a few KB on the wire)."""
    return chunk(b"zTXt", key + b"\0\0" + zlib.compress(b"x" * size, 9))


@pytest.fixture(scope="module")
def big_png() -> bytes:
    return one_bit_png(*MP40)


def small_png(w: int = 64, h: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def json_request(images: list[bytes], **options: Any) -> Request:
    """A JSON V1 POST of ``images`` as the ingress gets it, Host and length included."""
    instances = [{"image_b64": base64.b64encode(d).decode()} for d in images]
    body = json.dumps({"instances": instances, **options}).encode()
    sent = [False]

    async def receive() -> dict:
        if sent[0]:
            await asyncio.sleep(3600)
        sent[0] = True
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [
        (b"host", b"localhost"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    scope = {"type": "http", "method": "POST", "headers": headers, "server": ("127.0.0.1", 8000)}
    return Request(scope, receive)


class Call:
    """A stand-in deployment method: ``.remote(*args)`` records them and answers ``answer``."""

    def __init__(self, answer: Any) -> None:
        self.answer, self.calls = answer, []

    def remote(self, *args: Any) -> Any:
        self.calls.append(args)

        async def answer() -> Any:
            return self.answer(*args) if callable(self.answer) else self.answer

        return answer()


class Handle:
    """A stand-in deployment handle with the classifier's and explainer's methods."""

    deployment_name = "classifier-m"

    def __init__(self) -> None:
        self.metadata = Call({"labels": ["a", "b"], "input_size": [3, 32, 32]})
        self.predict = Call({"label": "a", "score": 1.0, "top_k": []})
        self.explain = Call(lambda crops, *_: [{"label": "a"} for _ in crops])


def ingress(**settings: Any) -> tuple[Any, Handle]:
    """The ingress class itself (under Serve's ASGI wrapper), built with stand-in handles."""
    handle = Handle()
    routes = Ingress.func_or_class.__mro__[1]  # what ``@serve.ingress`` wrapped
    return routes({"m": handle}, {"m": handle}, {"m": PRE}, settings), handle


@pytest.fixture()
def no_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any pixel decoded fails the test: a refusal must come before the decoder runs."""

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(serve.images, "decode_opened", refuse)


# --- the per-request budget: 413 from the headers, nothing decoded ---------------------------


def test_32_images_of_40_mp_are_a_413_before_any_decode(big_png: bytes, no_decode) -> None:
    """The issue's request: 32 × 40 MP 1-bit PNGs, ~210 KB of JSON, 3.8 GB once decoded."""
    assert len(big_png) < 8_000
    app, handle = ingress()
    request = json_request([big_png] * 32)
    with pytest.raises(ApiError) as err:
        asyncio.run(app.predict("m", request))
    assert err.value.status == 413 and err.value.kind == "too_many_pixels"
    assert "1280000000 pixels" in err.value.message
    assert app.admission.pixels == 0 and not handle.predict.calls
    # The same JSON shape as every other 413.
    handlers = {}
    install_handlers(type("App", (), {"add_exception_handler": handlers.__setitem__})())
    response = asyncio.run(handlers[ApiError](request, err.value))
    assert response.status_code == 413 and list(json.loads(response.body)) == ["error"]


def test_every_route_that_decodes_applies_the_budget(big_png: bytes, no_decode) -> None:
    app, _ = ingress(max_request_pixels=50_000_000, max_replica_pixels=50_000_000)
    for route in (app.predict, app.explain):
        with pytest.raises(ApiError) as err:
            asyncio.run(route("m", json_request([big_png] * 2)))
        assert err.value.status == 413, route
    # V2 BYTES goes through the same step.
    with pytest.raises(ApiError) as err:
        asyncio.run(app._inputs(["m"], [big_png] * 2))
    assert err.value.status == 413


def test_a_request_within_the_budget_is_decoded_and_gives_its_pixels_back() -> None:
    app, handle = ingress(max_request_pixels=10_000, max_replica_pixels=10_000)
    out = asyncio.run(app.predict("m", json_request([small_png(64, 48)] * 3)))
    assert len(out["predictions"]) == 3 and len(handle.predict.calls) == 3
    assert app.admission.pixels == 0
    with pytest.raises(ApiError) as err:  # 4 × 3072 > 10 000
        asyncio.run(app.predict("m", json_request([small_png(64, 48)] * 4)))
    assert err.value.status == 413


# --- the per-replica budget: 503 while others decode, given back when the pool is done -------


def test_the_replica_budget_refuses_with_503_while_others_hold_it() -> None:
    admission = Admission(IngressSettings(max_request_pixels=60, max_replica_pixels=100))
    release = admission.take_pixels(60)
    with pytest.raises(ApiError) as err:
        admission.take_pixels(50)
    assert err.value.status == 503 and err.value.headers == {"retry-after": "1"}
    admission.take_pixels(40)()  # what is left still fits
    release()
    release()  # a second release gives nothing back twice
    assert admission.pixels == 0
    admission.take_pixels(60)()


def test_pixels_stay_held_until_the_decode_pool_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request cancelled by its deadline leaves its decode running: its pixels stay counted
    until that decode ends, and a request beside it is told 503 meanwhile."""
    app, _ = ingress(max_request_pixels=5_000, max_replica_pixels=5_000)
    started, finish = threading.Event(), threading.Event()
    real = app._crops.decode_and_crop

    def slow(names: list[str], opened: list[Image.Image]) -> dict[str, np.ndarray]:
        started.set()
        finish.wait(10)
        return real(names, opened)

    monkeypatch.setattr(app._crops, "decode_and_crop", slow)

    async def scenario() -> None:
        first = asyncio.ensure_future(app._inputs(["m"], [small_png(64, 48)]))
        await asyncio.to_thread(started.wait, 10)
        assert app.admission.pixels == 64 * 48
        with pytest.raises(ApiError) as err:
            await app._inputs(["m"], [small_png(64, 48)])
        assert err.value.status == 503
        first.cancel()
        await asyncio.sleep(0.05)
        assert app.admission.pixels == 64 * 48  # the thread still decodes
        finish.set()
        for _ in range(200):
            if app.admission.pixels == 0:
                break
            await asyncio.sleep(0.01)
        assert app.admission.pixels == 0

    asyncio.run(scenario())


def test_the_budgets_are_settings_that_must_agree() -> None:
    defaults = IngressSettings()
    assert 40_000_000 <= defaults.max_request_pixels <= defaults.max_replica_pixels
    with pytest.raises(ValidationError, match="max_request_pixels"):
        IngressSettings(max_request_pixels=300_000_000, max_replica_pixels=200_000_000)
    with pytest.raises(ValidationError):
        IngressSettings(max_pixels_per_request=1)  # unknown keys stay errors


# --- decoding: text limits, the allow-list on every open, one original at a time ------------


def test_pillows_png_text_limits_are_the_metadata_limit() -> None:
    assert PngImagePlugin.MAX_TEXT_CHUNK == MAX_TEXT_BYTES
    assert PngImagePlugin.MAX_TEXT_MEMORY == MAX_TEXT_BYTES


@pytest.mark.parametrize(
    "after",
    [
        pytest.param(ztxt(b"one", 2 * MAX_TEXT_BYTES), id="one chunk over the limit"),
        pytest.param(
            b"".join(ztxt(b"k%d" % i, MAX_TEXT_BYTES // 2) for i in range(8)),
            id="many chunks, each under it",
        ),
    ],
)
def test_png_text_after_the_pixels_is_a_400(after: bytes) -> None:
    """Text chunks after the image data are read by the decode only, past every header check."""
    data = one_bit_png(64, 64, after)
    assert len(data) < 40_000
    with pytest.raises(ApiError) as err:
        decode_image(data)
    assert err.value.status == 400 and err.value.kind == "metadata"
    assert f"over {MAX_TEXT_BYTES} bytes" in err.value.message  # Pillow stopped, not kept it


def test_small_png_text_after_the_pixels_is_kept() -> None:
    img = decode_image(one_bit_png(64, 64, ztxt(b"note", 1000)))
    assert img.size == (64, 64) and img.mode == "RGB"


def test_every_open_of_an_upload_names_the_accepted_formats(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opens: list[Any] = []
    real = Image.open

    def recording(fp: Any, mode: str = "r", formats: Any = None) -> Image.Image:
        opens.append(formats)
        return real(fp, mode, formats)

    monkeypatch.setattr(Image, "open", recording)
    app, _ = ingress()
    asyncio.run(app.predict("m", json_request([small_png(), small_png(80, 60)])))
    decode_image(small_png())
    assert opens == [FORMATS] * 3


def test_the_originals_are_freed_once_cropped() -> None:
    app, _ = ingress()
    opened = serve.images.open_images([small_png(), small_png(80, 60)])
    crops = app._crops.decode_and_crop(["m"], opened)
    assert crops["m"].shape == (2, 32, 32, 3)
    for img in opened:
        with pytest.raises(ValueError, match="closed"):
            img.load()
            img.getpixel((0, 0))


# --- the explainer gets the crop, not the original ------------------------------------------


def test_the_explainer_receives_the_crops_the_classifier_would() -> None:
    app, handle = ingress()
    images = [small_png(640, 480), small_png(300, 500)]
    out = asyncio.run(app.explain("m", json_request(images, method="gradcam")))
    assert len(out["explanations"]) == 2
    ((crops, method, target),) = handle.explain.calls
    assert (method, target) == ("gradcam", None)
    assert crops.dtype == np.uint8 and crops.shape == (2, 32, 32, 3)
    opened = serve.images.open_images(images)
    np.testing.assert_array_equal(crops, app._crops.decode_and_crop(["m"], opened)["m"])
