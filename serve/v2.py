"""Open Inference Protocol (KServe V2) bodies, with Triton's binary-data extension.

Pure encode/decode, no Ray and no HTTP framework, so it is tested on its own. A request body is
JSON, or — when the ``Inference-Header-Content-Length`` header is present — that many bytes of
JSON followed by the raw tensors of the inputs that declare ``parameters.binary_data_size``, in
input order. Responses mirror it: outputs asked for with ``binary_data`` (or all outputs, with the
request parameter ``binary_data_output``) travel as raw bytes after the JSON header.

BYTES tensors in binary form are Triton's: each element a 4-byte little-endian length and its
bytes. JSON cannot carry raw bytes, so BYTES elements inside JSON are base64 strings.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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


class ProtocolError(ValueError):
    """The request does not follow the protocol; the message says where."""


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


def decode_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """Parse an infer request body.

    Args:
        body: the whole HTTP body.
        header_length: the ``Inference-Header-Content-Length`` header, if sent.
    """
    header, binary = _split(body, header_length)
    try:
        payload = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed JSON in the inference header ({exc})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise ProtocolError("the request needs an 'inputs' list")
    inputs, datatypes, offset = {}, {}, 0
    for spec in payload["inputs"]:
        name, datatype, shape = _tensor_spec(spec)
        size = _parameters(spec).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise ProtocolError(f"input {name!r}: binary_data_size beyond the body")
            inputs[name] = _from_binary(name, datatype, shape, binary[offset : offset + size])
            offset += size
        else:
            inputs[name] = _from_json(name, datatype, shape, spec.get("data"))
        datatypes[name] = datatype
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data belong to no input")
    outputs = {}
    for spec in payload.get("outputs") or []:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError("each requested output needs a 'name'")
        outputs[spec["name"]] = bool(_parameters(spec).get("binary_data", False))
    params = _parameters(payload)
    request_id = payload.get("id")
    return InferRequest(
        inputs=inputs,
        datatypes=datatypes,
        outputs=outputs,
        binary_default=bool(params.get("binary_data_output", False)),
        id=str(request_id) if request_id is not None else None,
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
    header = json.dumps(response).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def model_metadata(name: str, input_size: list[int], num_classes: int) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the tensors a carclf classifier takes and returns.

    ``input`` is FP32 ``[-1, C, H, W]`` preprocessed, or BYTES ``[-1]`` encoded images; the
    metadata lists the tensor form, as the ONNX model declares it.
    """
    return {
        "name": name,
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *input_size]}],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, num_classes]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, num_classes]},
        ],
    }


def datatype_of(array: np.ndarray) -> str:
    """The protocol's datatype name for a numeric numpy array."""
    for name, numpy_type in NUMPY_TYPES.items():
        if array.dtype == numpy_type:
            return name
    raise TypeError(f"no V2 datatype for numpy dtype {array.dtype}")


def deserialize_bytes(blob: bytes) -> list[bytes]:
    """The elements of a BYTES tensor in Triton's binary form."""
    items, pos = [], 0
    while pos < len(blob):
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
    if not header_length.strip().isdigit() or int(header_length) > len(body):
        raise ProtocolError(f"{HEADER_LENGTH} must be an integer no larger than the body")
    n = int(header_length)
    return body[:n], body[n:]


def _parameters(obj: dict) -> dict:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("'parameters' must be an object")
    return params


def _tensor_spec(spec: Any) -> tuple[str, str, tuple[int, ...]]:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ProtocolError("each input needs a 'name'")
    name, datatype, shape = spec["name"], spec.get("datatype"), spec.get("shape")
    if datatype != "BYTES" and datatype not in NUMPY_TYPES:
        raise ProtocolError(f"input {name!r}: unsupported datatype {datatype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    return name, datatype, tuple(shape)


def _count(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _from_binary(name: str, datatype: str, shape: tuple[int, ...], blob: bytes) -> np.ndarray:
    if datatype == "BYTES":
        items = deserialize_bytes(blob)
        return _object_array(name, items, shape)
    dtype = np.dtype(NUMPY_TYPES[datatype]).newbyteorder("<")
    if len(blob) != _count(shape) * dtype.itemsize:
        raise ProtocolError(
            f"input {name!r}: {len(blob)} bytes do not hold {datatype} of shape {list(shape)}"
        )
    return np.frombuffer(blob, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


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
    except (TypeError, ValueError):
        raise ProtocolError(f"input {name!r}: data is not {datatype}") from None
    if array.size != _count(shape):
        raise ProtocolError(f"input {name!r}: {array.size} values for shape {list(shape)}")
    return array.reshape(shape)


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
    return array.reshape(shape)
