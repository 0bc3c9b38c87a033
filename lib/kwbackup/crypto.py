"""age encryption of dumps: the pi5 encrypts what leaves it for the nas and offsite; readers decrypt.

Debian's `age` (the reference implementation; the same command decrypts a copy by hand in a
disaster, with nothing of kw-backup installed) runs as a pipeline stage: a dump is encrypted
and decrypted as it streams, and a plain copy exists only where a dump is restored or checked.
An encrypted copy `<dump>.age` has a manifest in clear with the encrypted file's size and
sha256 (checkable without the key), the recipients' public keys, and the plain dump's size
and sha256, checked once it is decrypted.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from . import dumps, files, names
from .errors import Failed, KwError, UsageError, VerificationError
from .log import log
from .run import Cmd, StageFailed, pipeline, run
from .settings import Settings

DECRYPT_STAGE = "age decrypt"
ENCRYPT_STAGE = "age encrypt"
IDENTITY_HINT = "see docs/install.md, Encryption: bw get ... into a 0600 file, removed afterwards"


def recipients(settings: Settings) -> list[str]:
    return (settings["AGE_RECIPIENTS"] or "").split()


def identity(settings: Settings, what: str) -> str:
    """AGE_IDENTITY_FILE, needed to read the encrypted `what`; UsageError (exit 2) when unset or missing."""
    path = settings["AGE_IDENTITY_FILE"]
    if not path:
        raise UsageError(
            f"{what} is encrypted: set AGE_IDENTITY_FILE to the age identity (secret key) file", IDENTITY_HINT
        )
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise UsageError(f"AGE_IDENTITY_FILE {path}: {exc.strerror}", IDENTITY_HINT) from exc
    if mode & 0o077:
        log.warning("AGE_IDENTITY_FILE %s can be read by others (mode %o): chmod 600 it", path, mode & 0o777)
    return path


def decrypt_cmd(identity_file: str) -> Cmd:
    return Cmd(["age", "--decrypt", "-i", identity_file], name=DECRYPT_STAGE)


def _reason(exc: StageFailed) -> str:
    """age's own error line, without its request to report errors upstream."""
    return next(
        (
            part.split("age: error: ", 1)[1]
            for line in reversed(exc.tail.splitlines())
            for part in line.split(" | ")
            if "age: error: " in part
        ),
        exc.tail or exc.detail,
    )


def decryption_error(
    exc: StageFailed, name: str, identity_file: str | None = None, recipients: list[str] | None = None
) -> KwError:
    """A failed decryption: the wrong key is the operator's to fix (exit 1); a damaged copy is exit 3.

    With the identity file and the manifest's recipients, a key that is one of them but does not
    open the copy's header means a damaged header, not the wrong key.
    """
    reason = _reason(exc)
    ours = bool(identity_file and recipients and _public_keys(identity_file) & set(recipients))
    if "no identity matched" in reason and ours:
        return VerificationError(
            f"{name}: cannot be decrypted, the copy is damaged or incomplete (its header does "
            "not open with the key, one of its recipients)",
            "use another copy (list-backups)",
        )
    if "no identity matched" in reason:
        return Failed(
            f"AGE_IDENTITY_FILE cannot decrypt {name}: its key is not one of the dump's recipients",
            "use the identity whose public key is in AGE_RECIPIENTS (the manifest lists them)",
        )
    if reason.startswith("reading "):
        return UsageError(f"AGE_IDENTITY_FILE is not a usable age identity: {reason}", IDENTITY_HINT)
    return VerificationError(
        f"{name}: cannot be decrypted, the copy is damaged or incomplete ({reason})", "use another copy (list-backups)"
    )


def _public_keys(identity_file: str) -> set[str]:
    code, out, _ = run(Cmd(["age-keygen", "-y", identity_file], name="age-keygen -y"), check=False, timeout=30)
    return set(out.decode(errors="replace").split()) if code == 0 else set()


def encrypt(source: Path, manifest: dumps.Manifest, directory: Path, keys: list[str]) -> dumps.Manifest:
    """`source` encrypted to `keys` as directory/<name>.age with its manifest; the source is re-checked meanwhile.

    age reads the source and writes the copy by itself (no bytes through Python); the source's
    sha256 is taken alongside, the copy's afterwards, both from the page cache.
    """
    name = source.name + names.AGE_SUFFIX
    source_check = _Digest(source)
    source_check.start()
    # Not fsynced: a copy on its way out, made again if lost; each place makes its own copy durable.
    with files.AtomicFile(directory, name, replace=True, durable=False) as out, open(source, "rb") as plain:
        try:
            pipeline(
                [Cmd(["age", "--encrypt", *(arg for key in keys for arg in ("-r", key))], name=ENCRYPT_STAGE)],
                stdin=plain.fileno(),
                stdout=out.fd,
            )
        except StageFailed as exc:
            reason = _reason(exc)
            hint = (
                "free space in PI5_DIR: the encrypted copy needs as much as the dump"
                if "no space left" in reason.lower()
                else "check AGE_RECIPIENTS and the pi5"
            )
            raise Failed(f"encrypting {source.name} failed: {reason}", hint) from exc
        finally:
            source_check.join()
        if (source_check.size, source_check.hexdigest) != (manifest.bytes, manifest.sha256):
            raise VerificationError(
                f"{source} no longer matches its manifest; not encrypting it",
                "the pi5's copy is damaged: check its disk",
            )
        out.commit()
    copy = _Digest(directory / name)
    copy.run()
    encrypted = dumps.Manifest(
        **{
            **vars(manifest),
            "file": name,
            "bytes": copy.size,
            "sha256": copy.hexdigest,
            "encryption": {
                "method": "age",
                "recipients": keys,
                "plain_file": manifest.file,
                "plain_bytes": manifest.bytes,
                "plain_sha256": manifest.sha256,
            },
        }
    )
    files.write_atomic(directory, name + names.MANIFEST_SUFFIX, encrypted.to_json(), replace=True)
    return encrypted


class _Digest(threading.Thread):
    """Size and sha256 of a file, in a thread of its own (hashlib releases the GIL)."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path = path
        self.size, self.hexdigest = 0, ""

    def run(self) -> None:
        reader = dumps.FileChunks(self.path)
        for _ in reader:
            pass
        self.size, self.hexdigest = reader.size, reader.sha256.hexdigest()


def _recipients(manifest: dumps.Manifest | None) -> list[str] | None:
    return (manifest.encryption or {}).get("recipients") if manifest else None


def decrypt_file(path: Path, identity_file: str, directory: Path) -> Path:
    """A local `.age` dump decrypted into `directory` under its plain name, with the plain manifest beside it."""
    manifest = dumps.read_manifest(path)
    plain_name = names.plain_name(path.name)
    with files.AtomicFile(directory, plain_name, replace=True) as out:
        writer = dumps.HashingWriter(out)
        try:
            pipeline([decrypt_cmd(identity_file), writer], stdin=dumps.FileChunks(path))
        except StageFailed as exc:
            raise (
                decryption_error(exc, path.name, identity_file, _recipients(manifest))
                if exc.stage == DECRYPT_STAGE
                else exc
            ) from exc
        out.commit()
    if manifest is not None:
        plain = manifest.plain()
        if (writer.size, writer.sha256.hexdigest()) != (plain.bytes, plain.sha256):
            raise VerificationError(
                f"{path.name} decrypts to other bytes than the dump its manifest describes",
                "use another copy (list-backups)",
            )
        files.write_atomic(directory, plain_name + names.MANIFEST_SUFFIX, plain.to_json(), replace=True)
    return directory / plain_name


def verify(path: Path, identity_file: str | None, quick: bool = False) -> dumps.Verified:
    """An encrypted dump: size and sha256 against its manifest; with the key (and not quick), its content too."""
    manifest = dumps.read_manifest(path)
    if identity_file is None or quick:
        if manifest is None:
            raise Failed(f"{path}: an encrypted dump without a manifest can only be checked with AGE_IDENTITY_FILE")
        return dumps.verify_file(path, manifest, whole=False)
    try:
        return dumps.verify_file(path, manifest, decrypt=decrypt_cmd(identity_file))
    except StageFailed as exc:  # only age's own failure comes back as it is
        raise decryption_error(exc, str(path), identity_file, _recipients(manifest)) from exc
