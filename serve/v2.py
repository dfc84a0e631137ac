"""Open Inference Protocol (KServe V2) bodies, with Triton's binary-data extension.

Pure encode/decode, no Ray and no HTTP framework, so it is tested on its own. A request body is
JSON, or — when the ``Inference-Header-Content-Length`` header is present — that many bytes of
JSON followed by the raw tensors of the inputs that declare ``parameters.binary_data_size``, in
input order. Responses mirror it: outputs asked for with ``binary_data`` (or all outputs, with the
request parameter ``binary_data_output``) travel as raw bytes after the JSON header.

BYTES tensors in binary form are Triton's: each element a 4-byte little-endian length and its
bytes. JSON cannot carry raw bytes, so BYTES elements inside JSON are base64 strings.

Every malformed body is a :class:`ProtocolError` with a message in the client's terms, never
another exception: JSON is parsed strictly (:func:`parse_json`: no ``NaN``, no numbers out of
range, no nesting beyond Python's recursion limit), shapes are checked with exact integers
before any array is built, and a response never carries ``NaN`` (JSON has no such literal).
Its strict parsers serve the V1 bodies and admission too: :func:`parse_json` and
:func:`byte_count` (a length header).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from carclf.errors import shown

HEADER_LENGTH = "Inference-Header-Content-Length"
NUMPY_TYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
# Enough for any image model's tensors; numpy refuses more than 64 and the shape is the client's.
MAX_DIMS = 8


class ProtocolError(ValueError):
    """The request does not follow the protocol; the message says where."""


class TooManyError(ProtocolError):
    """A request holds more items (images) than the server takes in one (HTTP 413)."""


def byte_count(header: str, most: int) -> int | None:
    """The byte count a length header states (``Content-Length``, :data:`HEADER_LENGTH`),
    capped at ``most + 1``; None where it states none.

    ASCII digits only, with spaces at the ends: ``str.isdigit`` also accepts "²" and other
    digits that ``int`` refuses. A count with more digits than ``most`` (leading zeros aside)
    is over it and is never converted: thousands of digits are past ``int``'s limit.
    """
    digits = header.strip()
    if not (digits.isascii() and digits.isdigit()):
        return None
    significant = digits.lstrip("0") or "0"
    if len(significant) > len(str(most)):
        return most + 1
    return min(int(significant), most + 1)


def parse_json(data: bytes | str) -> Any:
    """Parse a request body as strict JSON (RFC 8259), refusing what :mod:`json` lets through.

    Numbers are left to the callers, which check the ones they use: a float hook would slow
    every JSON tensor down, and an out-of-range float arrives as ``inf``, refused where used.

    Raises:
        ProtocolError: malformed JSON, ``NaN`` or ``Infinity``, an integer past Python's
            4,300-digit limit, or nesting deeper than Python's recursion limit.
    """
    try:
        return json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise ProtocolError("malformed JSON: nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"malformed JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise ProtocolError("malformed JSON: not UTF-8 text") from None
    except ValueError as exc:  # ours, or int()'s refusal of a number with too many digits
        reason = str(exc) if isinstance(exc, _ConstantError) else "an integer with too many digits"
        raise ProtocolError(f"malformed JSON: {reason}") from None


class _ConstantError(ValueError):
    """``NaN``, ``Infinity`` or ``-Infinity``: Python's extensions, not JSON."""


def _no_constant(name: str) -> Any:
    raise _ConstantError(f"{name} is not a JSON number")


@dataclass
class InferRequest:
    """A decoded inference request.

    Attributes:
        inputs: input name → tensor (BYTES as an object array of ``bytes``).
        datatypes: input name → its declared datatype.
        outputs: requested output name → whether it goes back as binary; empty means all.
        binary_default: binary form for outputs the request does not name.
        id: the request id, echoed in the response.
    """

    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    outputs: dict[str, bool] = field(default_factory=dict)
    binary_default: bool = False
    id: str | None = None


def decode_request(
    body: bytes, header_length: str | None = None, max_batch: int | None = None
) -> InferRequest:
    """Parse an infer request body.

    Args:
        body: the whole HTTP body.
        header_length: the ``Inference-Header-Content-Length`` header, if sent.
        max_batch: the most items an input's first dimension may declare; checked on the
            declared shape, before its data is read.

    Raises:
        TooManyError: an input declares more than ``max_batch`` items.
        ProtocolError: anything else that does not follow the protocol.
    """
    header, binary = _split(body, header_length)
    try:
        payload = parse_json(header)
    except ProtocolError as exc:
        raise ProtocolError(f"{exc} in the inference header") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise ProtocolError("the request needs an 'inputs' list")
    inputs, datatypes, offset = {}, {}, 0
    for spec in payload["inputs"]:
        name, datatype, shape = _tensor_spec(spec)
        if max_batch is not None and shape and shape[0] > max_batch:
            raise TooManyError(
                f"input {shown(name)} declares {shown(shape[0])} items; "
                f"at most {max_batch} per request"
            )
        size = _parameters(spec).get("binary_data_size")
        if size is not None:
            if not _is_int(size) or size < 0 or offset + size > len(binary):
                raise ProtocolError(f"input {shown(name)}: binary_data_size beyond the body")
            inputs[name] = _from_binary(name, datatype, shape, binary[offset : offset + size])
            offset += size
        else:
            inputs[name] = _from_json(name, datatype, shape, spec.get("data"))
        datatypes[name] = datatype
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data belong to no input")
    return InferRequest(
        inputs=inputs,
        datatypes=datatypes,
        outputs=_requested_outputs(payload),
        binary_default=bool(_parameters(payload).get("binary_data_output", False)),
        id=_request_id(payload),
    )


def encode_response(
    model_name: str, request: InferRequest, results: dict[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """The response body for ``results`` as the request asked for them.

    Returns:
        The body, and the JSON header's length when binary data follows it (else None).
    """
    unknown = set(request.outputs) - set(results)
    if unknown:
        raise ProtocolError(f"unknown output {sorted(unknown)[0]!r}; one of {sorted(results)}")
    names = list(request.outputs) or list(results)
    outputs, blobs = [], []
    for name in names:
        array = np.ascontiguousarray(results[name])
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array),
            "shape": list(array.shape),
        }
        if request.outputs.get(name, request.binary_default):
            blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    try:
        header = json.dumps(response, allow_nan=False).encode()
    except ValueError:  # JSON has no NaN or Infinity; the binary form would carry them silently
        raise ProtocolError("the outputs are not finite numbers (NaN or infinity)") from None
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def the_input(req: InferRequest) -> tuple[np.ndarray, str]:
    """The request's one input ``input`` and its datatype; BYTES must have shape ``[N]``.

    Raises:
        ProtocolError: another input, an empty one, or BYTES of another shape.
    """
    if set(req.inputs) != {"input"}:
        raise ProtocolError(f"the model takes one input named 'input', got {sorted(req.inputs)}")
    tensor, datatype = req.inputs["input"], req.datatypes["input"]
    if tensor.size == 0:
        raise ProtocolError("input 'input' is empty")
    if datatype == "BYTES" and tensor.ndim != 1:
        raise ProtocolError(f"BYTES input must have shape [N], got {list(tensor.shape)}")
    return tensor, datatype


def check_tensor(tensor: np.ndarray, datatype: str, size: list[int]) -> None:
    """Refuse a tensor input that is not FP32 ``[N, *size]`` of finite values.

    Raises:
        ProtocolError: another datatype or shape, or a NaN or infinite value.
    """
    if datatype != "FP32" or tensor.ndim != 4 or list(tensor.shape[1:]) != size:
        raise ProtocolError(
            f"input 'input' must be FP32 [N, {', '.join(map(str, size))}] or BYTES [N]; "
            f"got {datatype} {list(tensor.shape)}"
        )
    if not np.isfinite(tensor).all():
        raise ProtocolError("input 'input' holds NaN or infinite values")


def model_metadata(
    name: str, input_size: list[int], num_classes: int, parameters: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the tensors a carclf classifier takes and returns.

    ``input`` is FP32 ``[-1, C, H, W]`` preprocessed, or BYTES ``[-1]`` encoded images; the
    metadata lists the tensor form, as the ONNX model declares it. ``logits`` are the model's
    own, ``probabilities`` the calibrated softmax of ``logits / temperature``.

    Args:
        name: the model's name.
        input_size: ``[C, H, W]``.
        num_classes: the number of classes.
        parameters: extra facts under ``parameters`` (the execution provider, the temperature).
    """
    meta: dict[str, Any] = {
        "name": name,
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *input_size]}],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, num_classes]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, num_classes]},
        ],
    }
    if parameters:
        meta["parameters"] = parameters
    return meta


def datatype_of(array: np.ndarray) -> str:
    """The protocol's datatype name for a numeric numpy array."""
    for name, numpy_type in NUMPY_TYPES.items():
        if array.dtype == numpy_type:
            return name
    raise TypeError(f"no V2 datatype for numpy dtype {array.dtype}")


def deserialize_bytes(blob: bytes, max_items: int | None = None) -> list[bytes]:
    """The elements of a BYTES tensor in Triton's binary form.

    Args:
        blob: the tensor's bytes.
        max_items: refuse more elements than this (the declared shape's count), so a blob of
            millions of empty elements is refused before it becomes millions of objects.
    """
    items, pos = [], 0
    while pos < len(blob):
        if max_items is not None and len(items) >= max_items:
            raise ProtocolError(f"BYTES tensor holds more than the {max_items} declared elements")
        if pos + 4 > len(blob):
            raise ProtocolError("BYTES tensor ends inside an element length")
        (length,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if pos + length > len(blob):
            raise ProtocolError("BYTES tensor element runs past the end of its data")
        items.append(blob[pos : pos + length])
        pos += length
    return items


# --- helpers ------------------------------------------------------------------------------


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    n = byte_count(header_length, len(body))
    if n is None or n > len(body):
        raise ProtocolError(f"{HEADER_LENGTH} must be an integer no larger than the body")
    return body[:n], body[n:]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no integer


def _requested_outputs(payload: dict) -> dict[str, bool]:
    specs = payload.get("outputs")
    if specs is None:
        return {}
    if not isinstance(specs, list):
        raise ProtocolError("'outputs' must be a list")
    outputs = {}
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError("each requested output needs a 'name'")
        outputs[spec["name"]] = bool(_parameters(spec).get("binary_data", False))
    return outputs


def _request_id(payload: dict) -> str | None:
    request_id = payload.get("id")
    if request_id is None:
        return None
    if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        raise ProtocolError("'id' must be a string")
    return str(request_id)


def _parameters(obj: dict) -> dict:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("'parameters' must be an object")
    return params


def _tensor_spec(spec: Any) -> tuple[str, str, tuple[int, ...]]:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ProtocolError("each input needs a 'name'")
    name, datatype, shape = spec["name"], spec.get("datatype"), spec.get("shape")
    if not isinstance(datatype, str) or (datatype != "BYTES" and datatype not in NUMPY_TYPES):
        raise ProtocolError(f"input {shown(name)}: unsupported datatype {shown(datatype)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ProtocolError(f"input {shown(name)}: 'shape' must be a list of non-negative integers")
    if len(shape) > MAX_DIMS:
        raise ProtocolError(f"input {shown(name)}: {len(shape)} dimensions; at most {MAX_DIMS}")
    return name, datatype, tuple(shape)


def _count(shape: tuple[int, ...]) -> int:
    # Exact Python integers: numpy's int64 product wraps ([2**63-1, 2**63-1] → 1) or overflows.
    return math.prod(shape)


def _from_binary(name: str, datatype: str, shape: tuple[int, ...], blob: bytes) -> np.ndarray:
    if datatype == "BYTES":
        items = deserialize_bytes(blob, max_items=_count(shape))
        return _object_array(name, items, shape)
    dtype = np.dtype(NUMPY_TYPES[datatype]).newbyteorder("<")
    if len(blob) != _count(shape) * dtype.itemsize:
        raise ProtocolError(
            f"input {name!r}: {len(blob)} bytes do not hold {datatype} of shape {list(shape)}"
        )
    array = _reshaped(name, np.frombuffer(blob, dtype=dtype), shape)
    return array.astype(dtype.newbyteorder("="))


def _from_json(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    if not isinstance(data, list):
        raise ProtocolError(f"input {name!r} has neither 'data' nor binary_data_size")
    if datatype == "BYTES":
        flat = _flatten(data)
        try:
            items = [base64.b64decode(item, validate=True) for item in flat]
        except (binascii.Error, TypeError, ValueError):
            raise ProtocolError(f"input {name!r}: BYTES in JSON must be base64 strings") from None
        return _object_array(name, items, shape)
    try:
        array = np.asarray(_flatten(data), dtype=NUMPY_TYPES[datatype])
    except (TypeError, ValueError, OverflowError):
        raise ProtocolError(f"input {name!r}: data is not {datatype}") from None
    if array.size != _count(shape):
        raise ProtocolError(f"input {name!r}: {array.size} values for shape {list(shape)}")
    return _reshaped(name, array, shape)


def _flatten(data: list) -> list:
    """Row-major flattening: the protocol allows flat or nested ``data``."""
    flat: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _object_array(name: str, items: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    if len(items) != _count(shape):
        raise ProtocolError(f"input {name!r}: {len(items)} elements for shape {list(shape)}")
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return _reshaped(name, array, shape)


def _reshaped(name: str, flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``flat`` in ``shape``, whose element count it already has.

    A count of zero does not bound the other dimensions (``[0, 2**63]`` holds no element), and
    numpy refuses a dimension past its index type or a shape whose non-zero dimensions
    overflow its byte count: that is the client's shape, refused in its terms.
    """
    try:
        return flat.reshape(shape)
    except (ValueError, OverflowError):
        raise ProtocolError(
            f"input {shown(name)}: shape {shown(list(shape))} has dimensions too large for a tensor"
        ) from None
