"""V2 inputs that reached a 500 (issue #30, item 4): each is a ProtocolError (the ingress's
422) with a short message, never another exception. The parser alone, no Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serve import v2

HUGE = 2**63  # past numpy's index type


def _short(value: object) -> str:
    return repr(value) if len(repr(value)) < 12 else f"{len(str(value))} chars"


def _header(shape: list, datatype: str = "FP32", **spec) -> str:
    return json.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": datatype, **spec}]})


@pytest.mark.parametrize(
    "length",
    ["²", "١٢", "１２", "12²", "", " ", "-1", "+3", "1_0", "0x10", "1e3", "9" * 5000, "3.0"],
    ids=_short,
)
def test_a_header_length_that_is_not_ascii_digits_is_refused(length: str) -> None:
    with pytest.raises(v2.ProtocolError, match="must be an integer no larger than the body"):
        v2.decode_request(b'{"inputs": []}' + b"x" * 20, length)


@pytest.mark.parametrize("length", ["14", " 14 ", "0014", "0" * 5000 + "14"], ids=_short)
def test_a_header_length_in_ascii_digits_splits_the_body(length: str) -> None:
    header = b'{"inputs": []}'
    assert len(header) == 14
    with pytest.raises(v2.ProtocolError, match="belong to no input"):
        v2.decode_request(header + b"xx", length)  # split at 14: the rest is binary data
    assert v2.decode_request(header, length).inputs == {}


@pytest.mark.parametrize(
    ("header", "most", "count"),
    [("0", 5, 0), (" 5 ", 5, 5), ("6", 5, 6), ("9" * 5000, 5, 6), ("0" * 5000, 5, 0)],
    ids=_short,
)
def test_byte_count_is_capped_past_the_most_and_never_converts_a_huge_number(
    header: str, most: int, count: int
) -> None:
    assert v2.byte_count(header, most) == count
    assert v2.byte_count("²", most) is None and v2.byte_count("", most) is None


@pytest.mark.parametrize(
    "shape",
    [[0, HUGE], [HUGE, 0], [0, 2**63 - 1], [0, 2**62, 2**62], [0, 3, 10**30], [0, 10**4000]],
    ids=["0,2^63", "2^63,0", "0,2^63-1", "0,2^62,2^62", "0,3,1e30", "0,1e4000"],
)
@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
def test_an_empty_tensor_with_huge_dimensions_is_refused(shape: list, datatype: str) -> None:
    body = _header(shape, datatype, data=[]).encode()
    with pytest.raises(v2.ProtocolError, match="dimensions too large") as err:
        v2.decode_request(body)
    assert len(str(err.value)) < 200


@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
def test_an_empty_binary_tensor_with_huge_dimensions_is_refused(datatype: str) -> None:
    header = _header([0, HUGE], datatype, parameters={"binary_data_size": 0}).encode()
    with pytest.raises(v2.ProtocolError, match="dimensions too large"):
        v2.decode_request(header, str(len(header)))


def test_an_empty_tensor_of_modest_dimensions_still_parses() -> None:
    req = v2.decode_request(_header([0, 3, 224, 224], data=[]).encode())
    assert req.inputs["input"].shape == (0, 3, 224, 224)
    assert req.inputs["input"].dtype == np.float32
    with pytest.raises(v2.ProtocolError):  # and the server's one-input check refuses it
        v2.the_input(req)
