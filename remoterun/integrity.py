"""Scripts checked before they run: a pinned SHA-256, Ed25519 signatures, and the bytes run.

A script's metadata may pin `sha256 = "<hex>"`; `[integrity] public_keys` requires a signature
file `<script>.sig` beside each script (Ed25519: 64 raw bytes, or their base64 or hex) that one
of the keys verifies. It covers the script's bytes, and its sidecar metadata `<script>.toml`
when the catalogue read one (`signed_bytes`): a sidecar added, changed or removed after signing
fails the check, as a changed script does (issue 26). Either check in force, the file is read once,
checked, and the checked bytes are written to a private copy (a 0700 folder per attempt under the
database's `<db>-run/` folder, the file 0500) that is what runs: a script swapped or rewritten
after the check is never what runs. A script under no check runs from its own path, as before.
A sandbox must make that copy visible where it is (RunSpec.argv[0]).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from remoterun.errors import IntegrityFailed

SIG_SUFFIX = ".sig"
SIDECAR_SUFFIX = ".toml"  # a script's metadata beside it (catalogue/directory.py)
PAIR_HEADER = b"remoterun script+metadata v1\n"
SIG_BYTES = 64
MAX_SIG_FILE_BYTES = 4096
COPY_FOLDER_RE = re.compile(r"[0-9a-f-]{36}-[0-9]+")  # <task id>-<attempt>


def read_signature(path: Path) -> bytes:
    """A signature file's 64 bytes: raw (as `openssl pkeyutl -sign -rawin` writes them), or
    written as base64 or hex text (as `remoterun sign` does)."""
    with path.open("rb") as fh:
        raw = fh.read(MAX_SIG_FILE_BYTES + 1)
    if len(raw) == SIG_BYTES:
        return raw
    text = raw.strip()
    decoded = []
    with contextlib.suppress(ValueError):  # binascii.Error and UnicodeDecodeError are ValueErrors
        decoded.append(bytes.fromhex(text.decode("ascii")))
    with contextlib.suppress(ValueError):
        decoded.append(base64.b64decode(text, validate=True))
    for sig in decoded:
        if len(sig) == SIG_BYTES:
            return sig
    raise ValueError(f"expected {SIG_BYTES} bytes, raw or as base64 or hex")


def signed_bytes(script: bytes, sidecar_sha256: str | None) -> bytes:
    """What a script's signature covers: the script's bytes alone when no sidecar is read;
    with one, PAIR_HEADER then the SHA-256 (lowercase hex) of the script and of the sidecar,
    one line each (`printf` and `sha256sum` can build it for openssl)."""
    if sidecar_sha256 is None:
        return script
    digest = hashlib.sha256(script).hexdigest()
    return PAIR_HEADER + f"{digest}\n{sidecar_sha256}\n".encode()


class Integrity:
    """The server's integrity rules and the folder where checked copies run."""

    def __init__(self, public_keys: Sequence[bytes], run_dir: Path):
        self.keys = [Ed25519PublicKey.from_public_bytes(k) for k in public_keys]
        self.run_dir = run_dir

    def required(self, sha256: str | None) -> bool:
        """Whether a script with this pin (None: none) is checked at all."""
        return bool(self.keys) or sha256 is not None

    def verified(self, name: str, path: Path, sha256: str | None,
                 sidecar_sha256: str | None = None) -> bytes:
        """The script's bytes, read once and checked (a signature over them and the sidecar
        bytes whose digest is `sidecar_sha256`, when one was read); IntegrityFailed saying
        why not. Blocking: call it off the loop."""
        try:
            with path.open("rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise IntegrityFailed(f"script {name!r} cannot be read for its integrity check: "
                                  f"{exc.strerror}") from None
        if sha256 is not None:
            digest = hashlib.sha256(data).hexdigest()
            if not hmac.compare_digest(digest, sha256.lower()):
                raise IntegrityFailed(f"script {name!r} does not match its pinned sha256: it is "
                                      f"{digest}, its metadata pins {sha256.lower()}")
        if self.keys:
            self._check_signature(name, path, data, sidecar_sha256)
        return data

    def _check_signature(self, name: str, path: Path, data: bytes,
                         sidecar_sha256: str | None) -> None:
        sig_path = path.with_name(path.name + SIG_SUFFIX)
        try:
            sig = read_signature(sig_path)
        except FileNotFoundError:
            raise IntegrityFailed(f"script {name!r} is not signed: integrity.public_keys "
                                  f"requires {sig_path.name} beside it") from None
        except (OSError, ValueError) as exc:
            raise IntegrityFailed(f"script {name!r}: its signature {sig_path.name} cannot be "
                                  f"read: {exc}") from None
        message = signed_bytes(data, sidecar_sha256)
        for key in self.keys:
            with contextlib.suppress(InvalidSignature):
                key.verify(sig, message)
                return
        what = (f"the script and its sidecar {path.name}{SIDECAR_SUFFIX}" if sidecar_sha256
                else "the script")
        raise IntegrityFailed(f"script {name!r}: {sig_path.name} does not verify with any of "
                              f"integrity.public_keys over {what} (one of them changed, or "
                              f"the sidecar was added or removed after signing)")

    def private_copy(self, name: str, path: Path, sha256: str | None, label: str,
                     sidecar_sha256: str | None = None) -> Path:
        """Check the script and write the checked bytes to a private copy for one attempt
        (`label` names its folder); the copy's path, to run. Blocking: call it off the loop."""
        data = self.verified(name, path, sha256, sidecar_sha256)
        folder = self.run_dir / label
        shutil.rmtree(folder, ignore_errors=True)  # a crashed server's leftover of this attempt
        folder.mkdir(mode=0o700, parents=True)
        copy = folder / path.name
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o700)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        finally:
            os.chmod(copy, 0o500)
        return copy

    def discard(self, copy: Path) -> None:
        """Remove an attempt's private copy and its folder. Blocking: call it off the loop."""
        shutil.rmtree(copy.parent, ignore_errors=True)

    def clear(self) -> None:
        """Make the run folder (0700) and empty it of what a previous server left."""
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        for child in self.run_dir.iterdir():
            if COPY_FOLDER_RE.fullmatch(child.name):  # only what private_copy makes
                shutil.rmtree(child, ignore_errors=True)


# Signing (`remoterun sign`) ----------------------------------------------------------------

def new_key(path: Path) -> str:
    """Write a new Ed25519 private key (PEM, 0600, never over an existing file); its public
    key as base64, for `[integrity] public_keys`."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return public_key_text(key.public_key())


def public_key_text(key: Ed25519PublicKey) -> str:
    """A public key as `[integrity] public_keys` takes it: base64 of its 32 raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def sign(key_path: Path, script: Path) -> tuple[Path, str, Path | None]:
    """Sign a script, and its sidecar `<script>.toml` if it has one, with a PEM private key:
    writes `<script>.sig` (base64 text); returns its path, the key's public half and the
    sidecar signed with it (None: none)."""
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{key_path}: not an Ed25519 private key")
    sidecar = script.with_name(script.name + SIDECAR_SUFFIX)
    has_sidecar = sidecar.is_file()
    digest = hashlib.sha256(sidecar.read_bytes()).hexdigest() if has_sidecar else None
    sig_path = script.with_name(script.name + SIG_SUFFIX)
    signature = key.sign(signed_bytes(script.read_bytes(), digest))
    sig_path.write_text(base64.b64encode(signature).decode() + "\n")
    return sig_path, public_key_text(key.public_key()), sidecar if has_sidecar else None
