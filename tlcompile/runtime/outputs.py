"""Where predict, serve and bench may write, checked before any work is done, each refusal one line.

- Never inside the bundle they run: a file there that the manifest does not list fails every later ``verify``,
  ``predict`` and ``serve`` of that bundle (``tlcompile verify`` says which file, but the clinic box is down until
  someone removes it).
- An output file's folder must be a folder this user can write into (a file of that name, or a folder of ``/proc``,
  used to surface as a traceback after every image had been decided).
- A FHIR server URL must be http(s) with a host (``notaurl`` used to crash serve on its first image).
"""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path

from tlcompile.errors import TlcompileError
from tlcompile.runtime.bundle import bundle_root
from tlcompile.runtime.terminal import printable


def refuse_inside_bundle(option: str, path: str | Path, bundle: str | Path | None, *, kind: str = "file") -> None:
    """Refuse ``path`` (``kind``: file or folder) when it is the bundle's folder (or its bundle.json) or inside it."""
    if bundle is None:
        return
    root = bundle_root(bundle)
    if Path(path).resolve().is_relative_to(root.resolve()):
        raise TlcompileError(
            f"{option} '{path}' is inside the bundle {root}; writing there would break it (its manifest lists every "
            f"file); give a {kind} outside the bundle"
        )


def refuse_linked_folder(path: str | Path, what: str) -> None:
    """Refuse a sub-folder a command writes into (serve's errors/, the FHIR outbox) that is a symbolic link: whoever
    can write the camera's folder (where serve's records go by default) could point it into the bundle, whose next
    verify then fails, or anywhere else. --out itself is the user's choice and is checked where it is given."""
    path = Path(path)
    if path.is_symlink():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        raise TlcompileError(
            f"'{path}' is a symbolic link (to '{target}'), not a folder; {what} are written only into a real folder "
            "there; remove the link (a new folder is made in its place)"
        )


def check_parent_writable(option: str, path: str | Path) -> None:
    """Refuse an output file whose folder cannot hold it: the nearest existing folder above it is a file, or this
    user may not write there. The missing folders in between are created when the file is written."""
    path = Path(path)
    above = path.absolute().parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise TlcompileError(f"{option} '{path}': '{above}' is a file, not a folder; give a path in a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise TlcompileError(f"{option} '{path}': no permission to write into '{above}'; give a path you can write")


def check_new_file(option: str, path: str | Path) -> None:
    """An output file that must not exist yet (it is never overwritten), in a folder this user can write."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise TlcompileError(f"{option} '{path}' already exists; it is never overwritten; give a new file name")
    check_parent_writable(option, path)


def check_output_folder(option: str, folder: str | Path, *, what: str) -> None:
    """An output folder that may not exist yet: refused when it is a file, when it is there and this user cannot
    write into it (a read-only folder or mount: said now, not after the work), or when its nearest existing parent
    cannot be written (``what``: what goes in it, for the message)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TlcompileError(f"{option} '{folder}' is a file; give a folder for {what}")
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise TlcompileError(f"{option} '{folder}': no permission to write into it; give a folder you can write")
    if not folder.exists():
        check_parent_writable(option, folder)


def check_identifier_system(value: str, option: str = "--patient-id-system") -> str:
    """A FHIR identifier system: an absolute URI naming the register the patient IDs come from (the hospital's MRN
    namespace: ``urn:oid:1.2.3...``, ``https://hospital.example/mrn``), no space or control character."""
    valid = "valid: an absolute URI such as urn:oid:1.2.826.0.1.3680043 or https://hospital.example.org/mrn"
    shown = printable(value[:200])
    if any(c.isspace() or not c.isprintable() for c in value) or not value.isascii():
        raise TlcompileError(
            f"{option} '{shown}' has a space, a control character or a character outside ASCII in it (a URI "
            f"percent-encodes those); {valid}"
        )
    if len(value) > 1024:
        raise TlcompileError(f"{option} '{shown}...' is {len(value)} characters long; {valid}, of at most 1024")
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):.", value)
    if scheme is None or len(scheme.group(1)) < 2:  # 'C:' is a drive, not a scheme
        raise TlcompileError(f"{option} '{shown}' is not an absolute URI (it has no scheme, such as urn:); {valid}")
    oid, uuid = r"oid:[0-2](\.(0|[1-9]\d*))+", r"uuid:[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}"
    urn = rf"(?i)urn:({oid}|{uuid}|(?!oid:|uuid:)[a-z0-9][a-z0-9-]{{0,31}}:\S+)"
    if scheme.group(1).lower() == "urn" and not re.fullmatch(urn, value):
        raise TlcompileError(f"{option} '{shown}' is not a valid URN (urn:oid:1.2.3 or urn:uuid:...); {valid}")
    if scheme.group(1).lower() in ("http", "https") and not urllib.parse.urlsplit(value).hostname:
        raise TlcompileError(f"{option} '{shown}' has no host; {valid}")
    # one register, one string: 'urn:oid:' and a UUID's hex in lower case, as a DICOM file's own are written
    if value.lower().startswith("urn:uuid:"):
        return value.lower()
    return "urn:oid:" + value[8:] if value.lower().startswith("urn:oid:") else value


def check_server_url(url: str, option: str = "--fhir-url") -> str:
    """A server base URL: http or https, with a host (and a port, if any, from 1 to 65535), no user name or password
    in it, no space or control character: checked at start, so that a long-running serve never stops at its first
    image on what urllib refuses, and no password is printed in every retry line."""
    valid = "valid: an http:// or https:// URL with a host, such as https://fhir.example.org/fhir"
    # a user name and password are never shown, in this line or any other
    shown = printable(re.sub(r"^([A-Za-z][\w+.-]*:/*)?[^@]*@", r"\1...@", url))
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as err:  # a port that is not a number or out of range, a malformed IPv6 host
        raise TlcompileError(f"{option} '{shown}' is not a server address ({err}); {valid}") from err
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise TlcompileError(f"{option} '{shown}' is not a server address; {valid}")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise TlcompileError(
            f"{option} '{shown}' has a space or a control character in it; {valid} (a space in a path is %20)"
        )
    if parts.username is not None or parts.password is not None:
        raise TlcompileError(
            f"{option} '{parts.scheme}://...@{parts.hostname}': a user name or password in the URL is not sent as a "
            "login (urllib reads it as part of the host) and would be printed in every log line; give the URL "
            "without it"
        )
    if port == 0:
        raise TlcompileError(f"{option} '{shown}': port 0 is not a server's port; valid: 1 to 65535")
    return url
