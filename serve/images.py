"""Images in: decoding and its limits, the KServe V1 bodies that carry them, and the crops
each model takes.

Image policy (what :func:`decode_image` accepts): JPEG, PNG, WebP and GIF — any other format is
refused with 400 whatever its content type says, which keeps PIL's rarer decoders unreachable.
Animated GIF, WebP and PNG count as their first frame. Images must have at least
``MIN_SIDE`` pixels per side, an aspect ratio of at most ``MAX_ASPECT``:1, at most
``MAX_PIXELS`` pixels and at most ``MAX_TEXT_BYTES`` of text metadata (the serving limits of
:mod:`carclf.data.limits`); anything else is a 400 that says which limit. Grayscale, palette,
CMYK and 16-bit images become RGB, EXIF-rotated ones are turned upright
(:func:`carclf.data.transforms.upright_rgb`).

Decoding goes in two steps, so that what a request would cost is known before it is paid:
:func:`open_images` reads every image's header (size, format, the metadata before the pixel
data) and checks it, and the ingress then takes the request's decoded pixels from its budgets
(:meth:`serve.admission.Admission.take_pixels`) before :meth:`Crops.decode_and_crop` decodes
that same opened image: one ``Image.open``, with the format allow-list, per image, never a
second open without it. Text in a PNG after its pixel data is read only by the decode, so
Pillow's own limits on PNG text (process-wide, set below) stop it there; the metadata check
runs again on what the decode read.

A V1 body is JSON ``{"instances": [{"image_b64": …}], …}`` (parsed strictly,
:func:`serve.v2.parse_json`), a multipart upload field ``file``, or raw image bytes; the other
keys, form fields or query parameters are its options (``top_k``, ``method``, ``target``).
"""

import base64
import binascii
import contextlib
import io
import re
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import numpy as np
from fastapi import Request
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from carclf.data.limits import SERVE_FORMATS as FORMATS
from carclf.data.limits import SERVE_MAX_ASPECT as MAX_ASPECT
from carclf.data.limits import SERVE_MAX_PIXELS as MAX_PIXELS
from carclf.data.limits import SERVE_MAX_TEXT_BYTES as MAX_TEXT_BYTES
from carclf.data.limits import SERVE_MIN_SIDE as MIN_SIDE
from carclf.data.transforms import Preprocess, eval_resize_crop, upright_rgb
from serve import v2
from serve.errors import ApiError

IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif"})
MAX_TOP_K = 1000  # top_k beyond the classes is clamped; this only keeps the number small
Offload = Callable[..., Awaitable[Any]]  # runs fn(*args) off the event loop


# Pillow decompresses PNG text chunks (zTXt, iTXt) up to MAX_TEXT_CHUNK each and keeps up to
# MAX_TEXT_MEMORY of text per image (64 MiB by default), also from chunks after the pixel data,
# which no header check sees. Lowered to the metadata limit: what the check would refuse anyway
# is then never decompressed. These are Pillow's module globals, so they hold for the whole
# process; only serving imports this module, and the audit keeps what training can load.
PngImagePlugin.MAX_TEXT_CHUNK = MAX_TEXT_BYTES
PngImagePlugin.MAX_TEXT_MEMORY = MAX_TEXT_BYTES


@contextlib.contextmanager
def _client_errors() -> Iterator[None]:
    """PIL's failures on bad bytes as the 400s that say why: every one is the client's fault."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(400, "image too large (decompression bomb)", kind="too_large") from None
    except UnidentifiedImageError:
        raise ApiError(400, "not a JPEG, PNG, WebP or GIF image", kind="undecodable") from None
    except Exception as exc:  # PIL raises many types for bad bytes
        reason = str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__
        if "MAX_TEXT_" in reason:  # Pillow's PNG text limits, set to MAX_TEXT_BYTES above
            message = f"image metadata too large (over {MAX_TEXT_BYTES} bytes of text)"
            raise ApiError(400, message, kind="metadata") from None
        raise ApiError(400, f"invalid image: {reason}", kind="invalid") from None


def open_image(data: bytes) -> Image.Image:
    """Read an image's header, in the accepted formats only, and check every per-image limit.

    Nothing is decoded yet, so a request's images can be sized before any is (the pixel
    budgets); :func:`decode_opened` decodes the image returned.
    """
    if not data:
        raise ApiError(400, "empty image", kind="empty")
    with _client_errors():
        img = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
        _check_limits(img)
    return img


def open_images(encoded: list[bytes]) -> list[Image.Image]:
    """The opened, checked headers of a request's images (:func:`open_image`)."""
    return [open_image(data) for data in encoded]


def pixel_count(images: list[Image.Image]) -> int:
    """The pixels that decoding ``images`` makes (their headers' sizes)."""
    return sum(img.size[0] * img.size[1] for img in images)


def decode_opened(img: Image.Image) -> Image.Image:
    """Decode an image :func:`open_image` opened and checked into upright RGB, or raise a 400.

    The image itself is decoded, not its bytes opened again, so the format allow-list holds
    for the decoder too. The text read with the pixels (PNG chunks after them) is checked
    like the header's.
    """
    with _client_errors():
        rgb = upright_rgb(img)
        _check_text(img)
    return rgb


def decode_image(data: bytes) -> Image.Image:
    """Decode uploaded bytes into an upright RGB image, or raise a 400 that says why."""
    return decode_opened(open_image(data))


def _check_limits(img: Image.Image) -> None:
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ApiError(
            400, f"image too large ({w}x{h} pixels, at most {MAX_PIXELS})", kind="too_large"
        )
    if min(w, h) < MIN_SIDE:
        raise ApiError(
            400,
            f"image too small ({w}x{h}); each side needs {MIN_SIDE} px or more",
            kind="too_small",
        )
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise ApiError(400, f"aspect ratio of {w}x{h} is over {MAX_ASPECT:.0f}:1", kind="aspect")
    _check_text(img)


def _check_text(img: Image.Image) -> None:
    text = sum(len(v) for v in img.info.values() if isinstance(v, (str, bytes)))
    if text > MAX_TEXT_BYTES:
        raise ApiError(400, f"image metadata too large ({text} bytes of text)", kind="metadata")


def check_count(n: int, limit: int) -> None:
    """A 413 for more than ``limit`` images in one request."""
    if n > limit:
        raise ApiError(413, f"{n} images in one request; at most {limit}", kind="too_many_images")


async def v1_images(
    request: Request, body: bytes, max_images: int, offload: Offload
) -> tuple[list[bytes], dict[str, Any]]:
    """The encoded images and options of a V1 body: JSON (base64), multipart or raw bytes.

    Args:
        request: the request, for its content type, form and query.
        body: its body, already read within the limits.
        max_images: the most images one request may carry.
        offload: runs a function off the event loop (JSON parsing is CPU work).
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        return await offload(json_images, body, max_images)
    if kind == "multipart/form-data":
        form = await _replay(request, body).form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "multipart upload needs a file field named 'file'")
        options = {k: v for k, v in form.items() if k != "file" and isinstance(v, str)}
        return [await upload.read()], options
    if kind in IMAGE_TYPES:
        return [body], dict(request.query_params)
    raise ApiError(
        415,
        f"unsupported media type {kind or '(none)'}; send JSON, multipart "
        "or image/jpeg|png|webp|gif",
        kind="unsupported_type",
    )


def json_images(body: bytes, max_images: int) -> tuple[list[bytes], dict[str, Any]]:
    """The images of a JSON V1 body (``instances[].image_b64``) and its other keys."""
    try:
        payload = v2.parse_json(body)
    except v2.ProtocolError as exc:
        raise ApiError(422, str(exc)) from None
    instances = payload.get("instances") if isinstance(payload, dict) else None
    if not isinstance(instances, list) or not instances:
        raise ApiError(422, "JSON body needs a non-empty 'instances' list")
    check_count(len(instances), max_images)
    encoded = []
    for item in instances:
        b64 = item.get("image_b64") if isinstance(item, dict) else None
        if not isinstance(b64, str):
            raise ApiError(422, "each instance needs an 'image_b64' string")
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "image_b64 is not valid base64", kind="bad_base64") from None
        encoded.append(data)
    options = {k: v for k, v in payload.items() if k != "instances"}
    return encoded, options


def top_k(options: dict[str, Any], default: int) -> int:
    """The request's ``top_k`` option (``default`` when absent), clamped to ``MAX_TOP_K``."""
    k = options.get("top_k", default)
    # "5" from multipart or a query string, 5.0 from JSON; not "²", inf or 1e999.
    digits = isinstance(k, str) and re.fullmatch(r"\s*[0-9]{1,9}\s*", k)
    if digits or (isinstance(k, float) and k.is_integer()):
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, int):
        raise ApiError(422, "top_k must be an integer")
    if k < 1:
        raise ApiError(422, "top_k must be at least 1")
    return min(k, MAX_TOP_K)


def _replay(request: Request, body: bytes) -> Request:
    """A request whose body is ``body`` again: the stream was consumed by the size check."""

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


class Crops:
    """Each model's eval crop (the image half of its eval transform), once per distinct
    preprocessing: models that share one share the work.

    Args:
        preprocess: model name → the bundle's preprocessing (:class:`Preprocess` fields).
    """

    def __init__(self, preprocess: dict[str, dict[str, Any]]) -> None:
        specs = {n: Preprocess.model_validate(p) for n, p in preprocess.items()}
        self._key = {n: p.model_dump_json() for n, p in specs.items()}
        self._crop = {self._key[n]: eval_resize_crop(p) for n, p in specs.items()}

    def decode_and_crop(self, names: list[str], opened: list[Image.Image]) -> dict[str, np.ndarray]:
        """Model name → its resized and cropped uint8 ``[N, H, W, C]`` pixels of the images
        :func:`open_images` opened, decoded here one at a time.

        Each original is closed (its pixels freed) once cropped, so a request holds one
        decoded image beside its crops, not all of them. The classifier normalises the crops
        (:func:`carclf.data.transforms.to_model_input`): a quarter of the float tensor's bytes
        to send per image; the explainer explains them as they are.
        """
        keys = sorted({self._key[n] for n in names})
        rows: dict[str, list[np.ndarray]] = {key: [] for key in keys}
        for header in opened:
            try:
                img = decode_opened(header)
                try:
                    for key in keys:
                        rows[key].append(np.asarray(self._crop[key](img)))
                finally:
                    img.close()
            finally:
                header.close()
        by_key = {key: np.stack(crops) for key, crops in rows.items()}
        return {n: by_key[self._key[n]] for n in names}
