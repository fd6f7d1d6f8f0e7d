"""Signed bundles: Ed25519 over ``manifest.json`` (never imports torch).

The manifest lists the sha256 and size of every file the build wrote into the bundle, so a signature over its
exact bytes covers the model, ``bundle.json`` and the golden samples. Without a signature, whoever can write the
bundle can swap the model, regenerate the golden outputs and the manifest, and pass verify; with
``--trust PUBKEY``, verify, predict and serve accept only a bundle whose manifest a trusted key signed.

Files:

- ``tlcompile bundle keygen --out DIR`` writes ``DIR/tlcompile-signing.key`` (PKCS#8 PEM, mode 0600) and
  ``DIR/tlcompile-signing.pub`` (SubjectPublicKeyInfo PEM); it never overwrites a file.
- ``tlcompile bundle sign BUNDLE --key KEY`` writes ``BUNDLE/signature.json``:
  ``{"format": 1, "algorithm": "ed25519", "signed_file": "manifest.json", "manifest_sha256", "key_id", "signature"}``.
  It is not listed in the manifest (it signs the manifest), which the manifest check allows by name.

The cryptography is the ``cryptography`` package's (OpenSSL); nothing here is hand-rolled.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tlcompile.errors import BundleError, TlcompileError
from tlcompile.io import atomic_write_json
from tlcompile.runtime.manifest import MANIFEST_JSON, SIGNATURE_JSON, check_manifest

SIGNATURE_FORMAT = 1
PRIVATE_KEY_NAME = "tlcompile-signing.key"
PUBLIC_KEY_NAME = "tlcompile-signing.pub"
_MAX_KEY_FILE = 64 * 1024  # a PEM Ed25519 key is ~120 bytes; refuse to read anything absurd


class SigningError(TlcompileError):
    """A key or signature file is missing, malformed or does not match."""


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as err:  # pragma: no cover - a core dependency
        from tlcompile.errors import missing_dependency

        raise missing_dependency("cryptography", extra=None, err=err) from err
    return ed25519, serialization, InvalidSignature


def _raw_public(public_key) -> bytes:
    _, serialization, _ = _crypto()
    return public_key.public_bytes(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)


def key_id(public_key) -> str:
    """A short, stable name for a public key: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


def _read_key_file(path: Path, what: str, option: str) -> bytes:
    if not path.exists():
        raise SigningError(f"{option} '{path}': no such file; give the {what} file `tlcompile bundle keygen` wrote")
    if not path.is_file():
        raise SigningError(
            f"{option} '{path}' is not a regular file; give the {what} file `tlcompile bundle keygen` wrote"
        )
    if path.stat().st_size > _MAX_KEY_FILE:
        raise SigningError(
            f"{option} '{path}' is {path.stat().st_size} bytes, not a key file; give the {what} (PEM) file"
        )
    try:
        return path.read_bytes()
    except OSError as err:
        raise SigningError(f"{option} '{path}': cannot read it ({err.strerror or err})") from err


def load_private_key(path: str | Path):
    """An Ed25519 private key from a PEM (PKCS#8, unencrypted) file; one-line error for anything else."""
    ed25519, serialization, _ = _crypto()
    path = Path(path)
    data = _read_key_file(path, "private key", "--key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise SigningError(
            f"--key '{path}': not an unencrypted PEM private key "
            f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
            "give the .key file `tlcompile bundle keygen` wrote"
        ) from err
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningError(
            f"--key '{path}': a {type(key).__name__.lstrip('_')} key; "
            "valid: an Ed25519 private key (tlcompile bundle keygen)"
        )
    return key


def load_public_key(path: str | Path, option: str = "--trust"):
    """An Ed25519 public key from a PEM (SubjectPublicKeyInfo) file; one-line error for anything else."""
    ed25519, serialization, _ = _crypto()
    path = Path(path)
    data = _read_key_file(path, "public key", option)
    if b"PRIVATE KEY" in data:
        raise SigningError(
            f"{option} '{path}' holds a private key; give the public key (.pub) and keep the private one off the box"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise SigningError(
            f"{option} '{path}': not a PEM public key "
            f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
            "give the .pub file `tlcompile bundle keygen` wrote"
        ) from err
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SigningError(
            f"{option} '{path}': a {type(key).__name__.lstrip('_')} key; "
            "valid: an Ed25519 public key (tlcompile bundle keygen)"
        )
    return key


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode``; never replace an existing file (O_EXCL), and never leave half a key."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow it
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def keygen(out_dir: str | Path) -> tuple[Path, Path, str]:
    """Write a new key pair into ``out_dir``: (private key path, public key path, key id). Refuses existing files."""
    ed25519, serialization, _ = _crypto()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SigningError(f"--out '{out_dir}' is a file; give a folder for the key pair")
    private_path, public_path = out_dir / PRIVATE_KEY_NAME, out_dir / PUBLIC_KEY_NAME
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise SigningError(
                f"--out '{out_dir}': {path.name} already exists; a key is never overwritten; give another folder"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        _write_new(private_path, private_pem, 0o600)
        try:
            _write_new(public_path, public_pem, 0o644)
        except BaseException:
            private_path.unlink(missing_ok=True)  # ours, written a moment ago: no pair, no half pair
            raise
    except FileExistsError as err:
        raise SigningError(
            f"--out '{out_dir}': {Path(err.filename).name} appeared while writing; a key is never overwritten"
        ) from err
    except OSError as err:
        raise SigningError(f"--out '{out_dir}': cannot write the key pair ({err.strerror or err})") from err
    return private_path, public_path, key_id(key.public_key())


def sign_bundle(bundle_dir: str | Path, key_path: str | Path, *, replace: bool = False) -> dict:
    """Sign ``bundle_dir/manifest.json`` with the private key at ``key_path``; writes ``signature.json``.

    Signs only a bundle whose manifest check passes now (signing a damaged bundle would vouch for it).
    An existing signature is replaced only with ``replace``.
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"bundle '{root}' is not a folder; give the bundle/ folder a build wrote (BUILD_DIR/bundle)")
    key = load_private_key(key_path)
    manifest = check_manifest(root)
    if not manifest.ok:
        more = f" (and {len(manifest.problems) - 1} more)" if len(manifest.problems) > 1 else ""
        raise BundleError(f"bundle {root} fails its manifest, so it is not signed: {manifest.problems[0]}{more}")
    sig_path = root / SIGNATURE_JSON
    if (sig_path.exists() or sig_path.is_symlink()) and not replace:
        raise SigningError(
            f"bundle {root} is already signed ({sig_path}); add --replace to sign it again with this key"
        )
    data = (root / MANIFEST_JSON).read_bytes()
    record = {
        "format": SIGNATURE_FORMAT,
        "algorithm": "ed25519",
        "signed_file": MANIFEST_JSON,
        "manifest_sha256": hashlib.sha256(data).hexdigest(),
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(data)).decode("ascii"),
    }
    if sig_path.is_symlink():
        sig_path.unlink()  # never write through a link out of the bundle
    atomic_write_json(sig_path, record)
    return record


@dataclass
class SignatureCheck:
    """What verify found about the bundle's signature."""

    present: bool = False
    key_id: str = ""
    trusted_key_ids: list[str] = field(default_factory=list)
    required: bool = False  # --trust was given
    valid: bool = False  # verified against a trusted key
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and (self.valid or not self.required)


def check_signature(bundle_dir: str | Path, trusted: list[str | Path] | None = None) -> SignatureCheck:
    """Check ``signature.json`` against the trusted public keys (paths). Without trusted keys the signature is
    reported (present, key id) but not required. Never raises for a bad bundle; problems are one line each."""
    _, _, InvalidSignature = _crypto()
    root = Path(bundle_dir)
    keys = [load_public_key(p) for p in (trusted or [])]  # a bad --trust file is the user's mistake: raise
    check = SignatureCheck(required=bool(keys), trusted_key_ids=[key_id(k) for k in keys])
    sig_path = root / SIGNATURE_JSON
    if not sig_path.exists() and not sig_path.is_symlink():
        if check.required:
            check.problems.append(
                f"{SIGNATURE_JSON}: missing; the bundle is unsigned and --trust requires a signature by "
                f"key {', '.join(check.trusted_key_ids)} (tlcompile bundle sign)"
            )
        return check
    check.present = True
    try:
        if sig_path.is_symlink() or not sig_path.is_file():
            raise ValueError("not a regular file")
        if sig_path.stat().st_size > _MAX_KEY_FILE:
            raise ValueError(f"{sig_path.stat().st_size} bytes, too large")
        record = json.loads(sig_path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("the top level is not an object")
        if record.get("algorithm") != "ed25519" or record.get("signed_file") != MANIFEST_JSON:
            raise ValueError(
                f"algorithm {record.get('algorithm')!r} over {record.get('signed_file')!r}; "
                f"valid: ed25519 over {MANIFEST_JSON}"
            )
        signature = base64.b64decode(str(record.get("signature", "")), validate=True)
        check.key_id = str(record.get("key_id", ""))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        check.problems.append(f"{SIGNATURE_JSON}: not a valid signature file ({err})")
        return check
    except RecursionError:
        check.problems.append(f"{SIGNATURE_JSON}: not a valid signature file (nested too deeply)")
        return check
    try:
        data = (root / MANIFEST_JSON).read_bytes()
    except OSError as err:
        if keys:
            check.problems.append(f"{MANIFEST_JSON}: cannot read it to check the signature ({err.strerror or err})")
        return check  # without --trust, the manifest check says what is wrong with it
    signed, actual = record.get("manifest_sha256"), hashlib.sha256(data).hexdigest()
    if isinstance(signed, str) and signed != actual:
        # Seen without any key: the signature was made over another manifest, so the bundle changed after signing.
        check.problems.append(
            f"{SIGNATURE_JSON}: signed a different {MANIFEST_JSON} (sha256 {signed[:16]}, this one "
            f"{actual[:16]}); the bundle was changed after signing: restore it, or sign it "
            "again (tlcompile bundle sign --replace)"
        )
        return check
    if not keys:
        return check
    for key in keys:
        try:
            key.verify(signature, data)
        except InvalidSignature:
            continue
        check.valid, check.key_id = True, key_id(key)
        return check
    if check.key_id and check.key_id not in check.trusted_key_ids:
        check.problems.append(
            f"{SIGNATURE_JSON}: signed by key {check.key_id}, which is not trusted here (trusted: "
            f"{', '.join(check.trusted_key_ids)}); the bundle was not signed by your programme's key"
        )
    else:
        check.problems.append(
            f"{SIGNATURE_JSON}: the signature does not match {MANIFEST_JSON} under key "
            f"{', '.join(check.trusted_key_ids)}; the manifest was changed after signing"
        )
    return check
