"""Signed bundles: `tlcompile bundle keygen/sign` and `verify/predict/serve --trust` (issue 20, signed bundles)."""

from __future__ import annotations

import json
import stat

import pytest

from tlcompile.errors import BundleError
from tlcompile.io import sha256_file
from tlcompile.runtime.bundle import open_verified, verify_bundle, verify_lines
from tlcompile.runtime.manifest import check_manifest, manifest_entries
from tlcompile.runtime.serve import serve
from tlcompile.runtime.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, SigningError, keygen, sign_bundle


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two key pairs: the programme's own, and someone else's."""
    root = tmp_path_factory.mktemp("keys")
    ours = keygen(root / "ours")
    theirs = keygen(root / "theirs")
    return {"ours": ours, "theirs": theirs}


def _reseal(bundle):
    """What an attacker with write access does after changing a file: regenerate the manifest."""
    (bundle / "manifest.json").write_text(
        json.dumps({"format_version": 1, "files": manifest_entries(bundle)}, indent=2)
    )


def test_keygen_writes_a_private_key_0600_and_never_overwrites(tmp_path, run_cli):
    private, public, kid = keygen(tmp_path / "k")
    assert private.name == PRIVATE_KEY_NAME and public.name == PUBLIC_KEY_NAME and len(kid) == 16
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    before = (private.read_bytes(), public.read_bytes())
    cli = run_cli("bundle", "keygen", "--out", str(tmp_path / "k"))
    assert cli.returncode == 2 and "already exists" in cli.stderr and "Traceback" not in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1
    assert (private.read_bytes(), public.read_bytes()) == before
    # A folder holding only a user's file of that name is refused too, and the file is left alone.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / PUBLIC_KEY_NAME).write_text("mine")
    with pytest.raises(SigningError, match="never overwritten"):
        keygen(tmp_path / "other")
    assert (tmp_path / "other" / PUBLIC_KEY_NAME).read_text() == "mine"
    assert not (tmp_path / "other" / PRIVATE_KEY_NAME).exists()


def test_signed_bundle_passes_verify_predict_and_serve_under_trust(bundle_copy, keys, tmp_path, run_cli, fundus_images):
    private, public, kid = keys["ours"]
    cli = run_cli("bundle", "sign", str(bundle_copy), "--key", str(private))
    assert cli.returncode == 0, cli.stderr
    assert (bundle_copy / "signature.json").is_file() and kid in cli.stdout
    # The signature file is not in the manifest (it signs the manifest) and the manifest check allows it.
    assert check_manifest(bundle_copy).ok
    result = verify_bundle(bundle_copy, trust=[public])
    assert result.ok and result.signature.valid and result.signature.key_id == kid, result.to_dict()
    out = run_cli("verify", str(bundle_copy), "--trust", str(public))
    assert out.returncode == 0 and f"valid, by trusted key {kid}" in out.stdout and out.stdout.strip().endswith("PASS")
    # Without --trust a signed bundle still passes, and verify says the signature was not checked.
    plain = run_cli("verify", str(bundle_copy))
    assert plain.returncode == 0 and "not checked" in plain.stdout
    images = fundus_images(tmp_path / "in", 2)
    pred = run_cli("predict", str(bundle_copy), *map(str, images), "--trust", str(public))
    assert pred.returncode == 0, pred.stderr
    assert open_verified(bundle_copy, trust=[public]).signed_by == kid
    stats = serve(
        bundle_copy, tmp_path / "in", tmp_path / "records", once=True, settle=0, trust=[public], log=lambda _: None
    )
    assert stats.results == 2
    assert json.loads(next((tmp_path / "records").glob("*.json")).read_text())["bundle"]["signed_by"] == kid


def test_tampered_signed_bundle_fails_even_when_the_attacker_reseals_the_manifest(bundle_copy, keys, run_cli):
    """The attack the issue describes: change a file, regenerate the manifest. Plain verify sees that the signature
    was made over another manifest; an attacker who edits that field too passes plain verify (every sha256 matches the
    new manifest, the golden samples still agree); --trust catches both."""
    private, public, _ = keys["ours"]
    sign_bundle(bundle_copy, private)
    meta = json.loads((bundle_copy / "bundle.json").read_text())
    meta["model_card"] = {**meta.get("model_card", {}), "intended_use": "anything at all"}
    (bundle_copy / "bundle.json").write_text(json.dumps(meta))
    _reseal(bundle_copy)
    plain = verify_bundle(bundle_copy)
    assert not plain.ok and "signature.json: signed a different manifest.json" in plain.signature.problems[0]
    assert "changed after signing" in verify_bundle(bundle_copy, trust=[public]).signature.problems[0]
    record = json.loads((bundle_copy / "signature.json").read_text())
    record["manifest_sha256"] = sha256_file(bundle_copy / "manifest.json")
    (bundle_copy / "signature.json").write_text(json.dumps(record))
    assert verify_bundle(bundle_copy).ok  # what the attacker relies on
    result = verify_bundle(bundle_copy, trust=[public])
    assert not result.ok and result.golden is None  # the model is not even loaded
    assert "does not match manifest.json" in result.signature.problems[0]
    # the bundle has a quality gate: verify must not call it absent because it stopped before running it
    assert result.quality.present and result.quality.samples == 0
    assert "quality gate: present, not checked: the signature check failed" in "\n".join(verify_lines(result))
    cli = run_cli("verify", str(bundle_copy), "--trust", str(public))
    assert cli.returncode == 1 and "FAIL: signature.json: the signature does not match" in cli.stdout
    with pytest.raises(BundleError, match="fails its signature check"):
        open_verified(bundle_copy, trust=[public])
    # A tampered signature file itself: one line, FAIL.
    (bundle_copy / "signature.json").write_text("{not json")
    assert "not a valid signature file" in verify_bundle(bundle_copy, trust=[public]).signature.problems[0]


def test_unsigned_bundle_under_trust_fails_and_predict_serve_refuse(
    bundle_copy, keys, tmp_path, run_cli, fundus_images
):
    _, public, kid = keys["ours"]
    result = verify_bundle(bundle_copy, trust=[public])
    assert not result.ok and "unsigned" in result.signature.problems[0] and kid in result.signature.problems[0]
    assert "  signature: missing" in verify_lines(result)  # not "NOT valid": there is none to be valid
    images = fundus_images(tmp_path / "in", 1)
    pred = run_cli("predict", str(bundle_copy), str(images[0]), "--trust", str(public))
    assert pred.returncode == 2 and "fails its signature check" in pred.stderr and "Traceback" not in pred.stderr
    with pytest.raises(BundleError, match="unsigned"):
        serve(
            bundle_copy, tmp_path / "in", tmp_path / "records", once=True, settle=0, trust=[public], log=lambda _: None
        )
    assert not list((tmp_path / "records").glob("*.json"))


def test_bundle_resigned_with_another_key_fails(bundle_copy, keys, run_cli):
    _, public, _ = keys["ours"]
    their_private, _, their_kid = keys["theirs"]
    sign_bundle(bundle_copy, keys["ours"][0])
    # Re-signing needs --replace; then the bundle carries a valid signature, by a key the box does not trust.
    with pytest.raises(SigningError, match="already signed"):
        sign_bundle(bundle_copy, their_private)
    sign_bundle(bundle_copy, their_private, replace=True)
    result = verify_bundle(bundle_copy, trust=[public])
    assert not result.ok and f"signed by key {their_kid}, which is not trusted" in result.signature.problems[0]
    # Trusting both keys (a key rotation) accepts it.
    assert verify_bundle(bundle_copy, trust=[public, keys["theirs"][1]]).ok


def test_key_and_sign_mistakes_are_one_line(bundle_copy, keys, tmp_path, run_cli):
    private, public, _ = keys["ours"]
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("hello")
    cases = [
        (("verify", str(bundle_copy), "--trust", str(tmp_path / "missing.pub")), "no such file"),
        (("verify", str(bundle_copy), "--trust", str(garbage)), "not a PEM public key"),
        (("verify", str(bundle_copy), "--trust", str(private)), "holds a private key"),
        (("verify", str(bundle_copy), "--trust", str(tmp_path)), "not a regular file"),
        (("bundle", "sign", str(bundle_copy), "--key", str(public)), "not an unencrypted PEM private key"),
        (("bundle", "sign", str(tmp_path / "nope"), "--key", str(private)), "is not a folder"),
    ]
    for args, message in cases:
        cli = run_cli(*args)
        assert cli.returncode == 2, (args, cli.stdout, cli.stderr)
        assert message in cli.stderr and len(cli.stderr.strip().splitlines()) == 1 and "Traceback" not in cli.stderr, (
            args,
            cli.stderr,
        )
    # A damaged bundle is not signed: signing would vouch for it.
    (bundle_copy / "notes.txt").write_text("added")
    cli = run_cli("bundle", "sign", str(bundle_copy), "--key", str(private))
    assert cli.returncode == 2 and "notes.txt: not in the manifest" in cli.stderr
    assert not (bundle_copy / "signature.json").exists()
