"""Open Inference Protocol bodies (serve/v2.py) against tritonclient's own encoder and parser.

No server and no Ray: tritonclient builds the request bodies it would send and parses the
response bodies it would receive, so these tests pin wire compatibility at its defaults.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import tritonclient.http as tc

from serve import v2

Client = tc.InferenceServerClient


def fp32_input(array: np.ndarray, binary: bool = True) -> tc.InferInput:
    tensor = tc.InferInput("input", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def bytes_input(items: list[bytes], binary: bool = True) -> tc.InferInput:
    tensor = tc.InferInput("input", [len(items)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(items, dtype=object))
    else:  # JSON cannot carry raw bytes: BYTES elements in JSON are base64 strings
        b64 = [base64.b64encode(item).decode() for item in items]
        tensor.set_data_from_numpy(np.array(b64, dtype=object), binary_data=False)
    return tensor


def decode(inputs: list[tc.InferInput], outputs=None) -> v2.InferRequest:
    body, json_size = Client.generate_request_body(inputs, outputs=outputs)
    return v2.decode_request(body, None if json_size is None else str(json_size))


RESULTS = {
    "logits": np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5,
    "probabilities": np.full((2, 3), 1 / 3, dtype=np.float32),
}


@pytest.mark.parametrize("binary", [True, False])
def test_fp32_input_roundtrips_from_tritonclient(binary: bool) -> None:
    batch = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    req = decode([fp32_input(batch, binary)])
    assert req.datatypes == {"input": "FP32"}
    assert req.inputs["input"].dtype == np.float32
    np.testing.assert_array_equal(req.inputs["input"], batch)
    # tritonclient without requested outputs asks for every output in binary form
    assert req.outputs == {} and req.binary_default is True


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_input_roundtrips_from_tritonclient(binary: bool) -> None:
    items = [b"\xff\xd8\x00jpeg\x00bytes", b"", b"\x89PNG\r\n"]
    req = decode([bytes_input(items, binary)])
    assert req.datatypes == {"input": "BYTES"}
    assert list(req.inputs["input"]) == items


@pytest.mark.parametrize("binary", [True, False])
def test_response_parses_in_tritonclient(binary: bool) -> None:
    outputs = [tc.InferRequestedOutput(name, binary_data=binary) for name in RESULTS]
    req = decode([fp32_input(np.zeros((2, 3, 4, 5), np.float32))], outputs)
    body, header_length = v2.encode_response("body", req, RESULTS)
    assert (header_length is not None) == binary
    result = Client.parse_response_body(body, header_length=header_length)
    for name, expected in RESULTS.items():
        np.testing.assert_array_equal(result.as_numpy(name), expected)
    assert result.get_response()["model_name"] == "body"


def test_default_request_gets_all_outputs_in_binary() -> None:
    req = decode([fp32_input(np.zeros((2, 3, 4, 5), np.float32))])
    body, header_length = v2.encode_response("body", req, RESULTS)
    header = json.loads(body[:header_length])
    assert [o["name"] for o in header["outputs"]] == ["logits", "probabilities"]
    assert all("data" not in o for o in header["outputs"])
    np.testing.assert_array_equal(
        Client.parse_response_body(body, header_length=header_length).as_numpy("logits"),
        RESULTS["logits"],
    )


def test_only_requested_outputs_come_back_each_in_its_form() -> None:
    outputs = [tc.InferRequestedOutput("probabilities", binary_data=False)]
    req = decode([fp32_input(np.zeros((1, 3, 2, 2), np.float32))], outputs)
    body, header_length = v2.encode_response("body", req, RESULTS)
    assert header_length is None
    (out,) = json.loads(body)["outputs"]
    assert out["name"] == "probabilities" and out["shape"] == [2, 3] and len(out["data"]) == 6


def test_unknown_output_is_a_protocol_error() -> None:
    req = decode([fp32_input(np.zeros((1, 3, 2, 2), np.float32))], [tc.InferRequestedOutput("x")])
    with pytest.raises(v2.ProtocolError, match="unknown output 'x'"):
        v2.encode_response("body", req, RESULTS)


def test_request_id_is_echoed() -> None:
    body = json.dumps(
        {"id": "42", "inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1]}]}
    ).encode()
    req = v2.decode_request(body)
    assert json.loads(v2.encode_response("m", req, RESULTS)[0])["id"] == "42"


def test_nested_json_data_is_row_major() -> None:
    spec = {"name": "input", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4]]}
    req = v2.decode_request(json.dumps({"inputs": [spec]}).encode())
    np.testing.assert_array_equal(req.inputs["input"], [[1, 2], [3, 4]])


def test_bytes_deserialisation_inverts_tritonclient() -> None:
    items = [b"a", b"", b"\x00\x01\x02"]
    blob = tc.serialize_byte_tensor(np.array(items, dtype=object)).item()
    assert v2.deserialize_bytes(blob) == items


def _spec(**kw) -> dict:
    return {"name": "input", "shape": [2], "datatype": "FP32", **kw}


@pytest.mark.parametrize(
    ("body", "header", "match"),
    [
        (b"{not json", None, "malformed JSON"),
        (b"[]", None, "'inputs' list"),
        (json.dumps({"inputs": [{"shape": [1]}]}).encode(), None, "needs a 'name'"),
        (json.dumps({"inputs": [_spec(datatype="FP8", data=[1, 2])]}).encode(), None, "FP8"),
        (json.dumps({"inputs": [_spec(shape=[-1], data=[1])]}).encode(), None, "non-negative"),
        (json.dumps({"inputs": [_spec()]}).encode(), None, "neither 'data'"),
        (json.dumps({"inputs": [_spec(data=[1, 2, 3])]}).encode(), None, "3 values"),
        (json.dumps({"inputs": [_spec(data=["x", "y"])]}).encode(), None, "not FP32"),
        (
            json.dumps({"inputs": [_spec(datatype="BYTES", data=["%%", "ok=="])]}).encode(),
            None,
            "base64",
        ),
        (b"{}", "abc", "must be an integer"),
        (b"{}", "99", "no larger than the body"),
    ],
)
def test_malformed_requests_say_what_is_wrong(body: bytes, header, match: str) -> None:
    with pytest.raises(v2.ProtocolError, match=match):
        v2.decode_request(body, header)


def test_binary_sizes_must_add_up() -> None:
    spec = _spec(parameters={"binary_data_size": 8})
    header = json.dumps({"inputs": [spec]}).encode()
    blob = np.ones(2, np.float32).tobytes()
    assert v2.decode_request(header + blob, str(len(header))).inputs["input"].tolist() == [1, 1]
    with pytest.raises(v2.ProtocolError, match="beyond the body"):
        v2.decode_request(header + blob[:4], str(len(header)))
    with pytest.raises(v2.ProtocolError, match="belong to no input"):
        v2.decode_request(header + blob + b"xx", str(len(header)))
    spec["parameters"]["binary_data_size"] = 4
    header = json.dumps({"inputs": [spec]}).encode()
    with pytest.raises(v2.ProtocolError, match="do not hold FP32"):
        v2.decode_request(header + blob[:4], str(len(header)))


def test_truncated_bytes_tensor_is_refused() -> None:
    with pytest.raises(v2.ProtocolError, match="runs past"):
        v2.deserialize_bytes(b"\x09\x00\x00\x00abc")
    with pytest.raises(v2.ProtocolError, match="inside an element length"):
        v2.deserialize_bytes(b"\x01\x00")


def test_model_metadata_describes_the_tensors() -> None:
    meta = v2.model_metadata("body", [3, 32, 32], 7)
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert [o["shape"] for o in meta["outputs"]] == [[-1, 7], [-1, 7]]


# --- hostile bodies: each a ProtocolError that says what is wrong, never another exception --


def _body(shape: list, datatype: str = "BYTES", data: list | None = None) -> bytes:
    spec = {"name": "input", "shape": shape, "datatype": datatype, "data": data or ["eA=="]}
    return json.dumps({"inputs": [spec]}).encode()


NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("body", "match"),
    [
        pytest.param(b'{"inputs": ' + NESTED + b"}", "nested too deeply", id="100k deep"),
        pytest.param(_body([2**63 - 1, 2**63 - 1]), "1 elements for shape", id="2^63-1 squared"),
        pytest.param(_body([2**64]), "1 elements for shape", id="2^64"),
        pytest.param(_body([1] * 100), "100 dimensions; at most 8", id="100 dims"),
        pytest.param(_body([True]), "non-negative integers", id="[true]"),
        pytest.param(_body([1.0]), "non-negative integers", id="[1.0]"),
        pytest.param(_body([1], "FP32", ["NaN"]).replace(b'"NaN"', b"NaN"), "NaN is not a JSON"),
        pytest.param(_body([1], "FP32", [1]).replace(b"[1]", b"[-Infinity]", 1), "Infinity"),
        pytest.param(
            _body([1], "FP32", [1]).replace(b"[1]", b"[" + b"9" * 5000 + b"]", 1), "digits"
        ),
        pytest.param(_body([1], "INT32", [2**40]), "data is not INT32", id="int32 overflow"),
        pytest.param(b'{"inputs": [], "outputs": 5}', "'outputs' must be a list"),
        pytest.param(b'{"inputs": [], "id": [[[[[1]]]]]}', "'id' must be a string"),
        pytest.param(b'{"inputs": "\xc3\x28"}', "not UTF-8", id="not utf-8"),
    ],
)
def test_hostile_bodies_are_protocol_errors(body: bytes, match: str) -> None:
    with pytest.raises(v2.ProtocolError, match=match) as err:
        v2.decode_request(body)
    assert len(str(err.value)) < 200


def test_declared_batch_over_the_cap_is_refused_before_its_data() -> None:
    with pytest.raises(v2.TooManyError, match="declares 33 items; at most 32"):
        v2.decode_request(_body([33], data=[]), max_batch=32)
    with pytest.raises(v2.TooManyError, match="at most 32"):
        v2.decode_request(_body([2**64]), max_batch=32)
    assert v2.decode_request(_body([1]), max_batch=32).inputs["input"].shape == (1,)


def test_binary_bytes_tensor_cannot_hold_more_than_its_shape() -> None:
    blob = b"\x00\x00\x00\x00" * 1000  # a thousand empty elements for a declared [1]
    spec = {"name": "input", "shape": [1], "datatype": "BYTES"}
    spec["parameters"] = {"binary_data_size": len(blob)}
    header = json.dumps({"inputs": [spec]}).encode()
    with pytest.raises(v2.ProtocolError, match="more than the 1 declared"):
        v2.decode_request(header + blob, str(len(header)))
    spec["parameters"]["binary_data_size"] = True  # JSON true is no size
    header = json.dumps({"inputs": [spec]}).encode()
    with pytest.raises(v2.ProtocolError, match="binary_data_size"):
        v2.decode_request(header + blob[:1], str(len(header)))


def test_json_response_never_carries_nan() -> None:
    req = decode([fp32_input(np.zeros((1, 3, 2, 2), np.float32), binary=False)])
    req.binary_default = False
    bad = {"logits": np.array([[np.nan, 1.0]], np.float32)}
    with pytest.raises(v2.ProtocolError, match="not finite"):
        v2.encode_response("body", req, bad)


def test_model_metadata_carries_provider_and_temperature() -> None:
    facts = {"execution_provider": "CPUExecutionProvider", "temperature": 1.5}
    meta = v2.model_metadata("body", [3, 32, 32], 7, facts)
    assert meta["parameters"] == facts
    assert "parameters" not in v2.model_metadata("body", [3, 32, 32], 7)
