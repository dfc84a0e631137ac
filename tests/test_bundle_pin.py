"""Pinning a bundle by its digest (issue #14): bundle.json's own hashes catch corruption, the
digest of bundle.json catches tampering with any file, bundle.json included. No Ray, no ONNX."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from carclf import cli
from carclf.bundle import (
    BUNDLE_FILE,
    MODEL_CARD_FILE,
    ONNX_FILE,
    WEIGHTS_FILE,
    bundle_digest,
    load_bundle,
    normalize_sha256,
    split_pinned,
    write_bundle,
)
from carclf.data.manifest import file_sha256
from carclf.errors import UserInputError

from .conftest import stand_in_bundle_info


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    """A bundle whose files are stand-ins: pinning checks bytes, not what they mean."""
    info = stand_in_bundle_info()
    writers = {
        name: (lambda p, n=name: p.write_bytes(f"{n} bytes".encode()))
        for name in (ONNX_FILE, WEIGHTS_FILE, MODEL_CARD_FILE)
    }
    return write_bundle(tmp_path / "bundle", info, writers).path


def test_the_digest_is_sha256sum_of_bundle_json_and_a_pinned_load_passes(bundle: Path) -> None:
    digest = bundle_digest(bundle)
    assert digest == hashlib.sha256((bundle / BUNDLE_FILE).read_bytes()).hexdigest()
    assert load_bundle(bundle, expected_sha256=digest).info.name == "toy"
    assert load_bundle(bundle, expected_sha256=f"sha256:{digest.upper()}").info.name == "toy"


def test_a_tampered_file_with_rewritten_hashes_passes_verify_but_not_the_pin(
    bundle: Path,
) -> None:
    digest = bundle_digest(bundle)
    (bundle / ONNX_FILE).write_bytes(b"someone else's model")
    meta = json.loads((bundle / BUNDLE_FILE).read_text())
    meta["files"][ONNX_FILE] = file_sha256(bundle / ONNX_FILE)  # the tamperer fixes the hash
    (bundle / BUNDLE_FILE).write_text(json.dumps(meta, indent=2))
    load_bundle(bundle)  # the bundle's own hashes cannot see it: they were rewritten too
    with pytest.raises(UserInputError, match="the pin expects") as err:
        load_bundle(bundle, expected_sha256=digest)
    assert "\n" not in str(err.value)


def test_a_file_changed_under_an_intact_bundle_json_is_refused_with_the_pin(
    bundle: Path,
) -> None:
    digest = bundle_digest(bundle)
    (bundle / WEIGHTS_FILE).write_bytes(b"flipped")
    with pytest.raises(UserInputError, match=f"sha256 of {WEIGHTS_FILE} does not match"):
        load_bundle(bundle, expected_sha256=digest)


def test_bad_digests_and_refs(bundle: Path) -> None:
    with pytest.raises(UserInputError, match="not a sha256 digest"):
        load_bundle(bundle, expected_sha256="abc")
    with pytest.raises(ValueError, match="verify=True"):
        load_bundle(bundle, verify=False, expected_sha256=bundle_digest(bundle))
    hexd = "a" * 64
    assert split_pinned(f"/b/x@sha256:{hexd}") == ("/b/x", hexd)
    assert split_pinned("/b/x") == ("/b/x", None)
    assert normalize_sha256(f"SHA256:{hexd.upper()}") == hexd


def test_a_listed_name_outside_the_bundle_is_refused(bundle: Path) -> None:
    meta = json.loads((bundle / BUNDLE_FILE).read_text())
    meta["files"]["../outside"] = "0" * 64
    (bundle / BUNDLE_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserInputError, match="not a file name inside the bundle"):
        load_bundle(bundle)


def test_carclf_bundle_digest_prints_the_pinned_ref_and_checks_one(
    bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["bundle", "digest", str(bundle)]) == 0
    ref = capsys.readouterr().out.strip().splitlines()[-1]
    assert ref == f"{bundle}@sha256:{bundle_digest(bundle)}"
    assert cli.main(["bundle", "digest", ref]) == 0
    capsys.readouterr()
    (bundle / MODEL_CARD_FILE).write_text("edited")
    assert cli.main(["bundle", "digest", ref]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("carclf: error: ") and MODEL_CARD_FILE in err
