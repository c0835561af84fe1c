"""The service's guards: the access token, and uploads that can never write outside their dataset folder.

Uploaded files keep only a checked base name (no separators, no leading dot, a short allow-listed alphabet), are
written with ``O_CREAT | O_EXCL | O_NOFOLLOW`` inside a folder that is checked not to be a symlink, are size-limited
while they stream, and must decode as the image type their extension claims. A zip is checked entry by entry
before anything is extracted: an absolute path, ``..``, a symlink entry or a sub-folder refuses the whole upload.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import lzma
import os
import re
import secrets
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

IMAGE_TYPES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}
TEXT_TYPES = (".txt", ".caption")
ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
# what reading a damaged member can raise: a bad CRC or header (BadZipFile), a truncated or corrupt stream
ZIP_READ_ERRORS = (zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError, ValueError,
                   NotImplementedError, RuntimeError)
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,127}$")


class UploadRefused(Exception):
    """An upload (or a part of it) that is not accepted; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422, field: str = "files") -> None:
        super().__init__(message)
        self.status = status
        self.field = field


# --- the token ----------------------------------------------------------------------------------------------------
def load_or_create_token(home: Path, given: str | None) -> tuple[str, bool]:
    """The access token: ``given`` (``--token`` / ``LORA_SCRIPTS_TOKEN``), else the one saved in
    ``<home>/token``, else a new random one saved there (mode 0600). Returns (token, newly created)."""
    if given:
        return given, False
    path = home / "token"
    if path.is_file():
        token = path.read_text(encoding="utf-8").strip()
        if token:
            return token, False
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    return token, True


def token_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison."""
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- paths --------------------------------------------------------------------------------------------------------
def safe_filename(name: str) -> str:
    """``name`` if it is a plain, safe file name; otherwise refuse (never silently rename into something else)."""
    if not name or "/" in name or "\\" in name or "\x00" in name or name in (".", "..") or not SAFE_NAME.match(name):
        raise UploadRefused(f"file name {name!r} is not allowed: use letters, digits, '.', '_', '-' or spaces, "
                            "no folders and no leading dot")
    return name


def is_inside(path: Path, root: Path) -> bool:
    """True if ``path`` (resolved, symlinks followed) lies inside ``root`` (resolved)."""
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def check_folder(folder: Path, root: Path) -> None:
    """``folder`` must be a real folder (no symlink anywhere below ``root``) inside ``root``."""
    if not is_inside(folder, root):
        raise UploadRefused(f"folder {folder} is outside {root}", status=400)
    current = folder
    while current != root and current != current.parent:
        if current.is_symlink():
            raise UploadRefused(f"{current} is a symlink; uploads never follow links", status=400)
        current = current.parent


# --- writing one file ---------------------------------------------------------------------------------------------
@dataclass
class UploadLimits:
    """How much an upload may hold."""

    max_file_bytes: int = 20 * 1024 * 1024
    max_total_bytes: int = 200 * 1024 * 1024
    max_files: int = 2000


def check_type(name: str, data: bytes) -> None:
    """The bytes must be what the extension says: an image PIL decodes as that format, or UTF-8 text."""
    suffix = Path(name).suffix.lower()
    if suffix in TEXT_TYPES:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise UploadRefused(f"{name}: not UTF-8 text") from None
        return
    if suffix not in IMAGE_TYPES:
        allowed = ", ".join(sorted(set(IMAGE_TYPES) | set(TEXT_TYPES) | {".zip"}))
        raise UploadRefused(f"{name}: type {suffix or '(none)'} is not accepted; upload {allowed}", status=415)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.verify()
    except Exception:  # PIL raises many types for broken data
        raise UploadRefused(f"{name}: not a readable image", status=415) from None
    if fmt != IMAGE_TYPES[suffix]:
        raise UploadRefused(f"{name}: the file is {fmt}, not {IMAGE_TYPES[suffix]} as its name says", status=415)


def write_new_file(folder: Path, name: str, data: bytes, replace: bool = True) -> Path:
    """Write ``data`` as ``folder/name`` without following a symlink at the target; the caller checked ``folder``."""
    target = folder / safe_filename(name)
    if target.is_symlink():
        raise UploadRefused(f"{name}: a symlink is in the way; uploads never follow links", status=400)
    tmp = folder / f".upload-{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        if not replace and target.exists():
            raise UploadRefused(f"{name}: already exists", status=409)
        os.replace(tmp, target)  # rename replaces a file or a symlink itself, never what a link points to
    finally:
        tmp.unlink(missing_ok=True)
    return target


def read_limited(stream: BinaryIO, limit: int, name: str) -> bytes:
    """Read at most ``limit`` bytes; refuse (413) a stream that holds more."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise UploadRefused(f"{name}: larger than the limit of {limit} bytes", status=413)
    return data


def _zip_entries(archive: zipfile.ZipFile, limits: UploadLimits, zip_name: str) -> list[zipfile.ZipInfo]:
    """Every file entry of the archive, all checked before any is extracted."""
    entries, total = [], 0
    for info in archive.infolist():
        name = info.filename
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise UploadRefused(f"{zip_name}: entry {name!r} is a symlink; archives with links are refused")
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in re.split(r"[/\\]", name):
            raise UploadRefused(f"{zip_name}: entry {name!r} points outside the dataset folder (path traversal)")
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            raise UploadRefused(f"{zip_name}: entry {name!r} is encrypted; upload a zip without a password", 415)
        if info.compress_type not in ZIP_METHODS:
            raise UploadRefused(f"{zip_name}: entry {name!r} uses compression method {info.compress_type}, which is "
                                "not supported; make the zip with deflate (the default of most tools)", 415)
        if "/" in name or "\\" in name:
            raise UploadRefused(f"{zip_name}: entry {name!r} is in a sub-folder; put the files at the top of the zip")
        if info.file_size > limits.max_file_bytes:
            raise UploadRefused(f"{zip_name}: entry {name!r} is larger than the limit of {limits.max_file_bytes} "
                                "bytes", status=413)
        total += info.file_size
        safe_filename(name)
        entries.append(info)
    if total > limits.max_total_bytes:
        raise UploadRefused(f"{zip_name}: unpacks to more than {limits.max_total_bytes} bytes", status=413)
    if len(entries) > limits.max_files:
        raise UploadRefused(f"{zip_name}: more than {limits.max_files} files", status=413)
    return entries


def extract_zip(data: bytes, folder: Path, limits: UploadLimits, zip_name: str) -> list[Path]:
    """Check every entry, then write each (type-checked, size-limited as it is read: the declared sizes in a zip
    can lie) into ``folder``."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, NotImplementedError):
        raise UploadRefused(f"{zip_name}: not a readable zip file", status=415) from None
    with archive:
        entries = _zip_entries(archive, limits, zip_name)
        contents = []
        for info in entries:
            try:
                with archive.open(info) as member:
                    body = read_limited(member, limits.max_file_bytes, f"{zip_name}:{info.filename}")
            except ZIP_READ_ERRORS as exc:  # a CRC mismatch, a truncated or corrupt stream
                raise UploadRefused(f"{zip_name}: entry {info.filename!r} is damaged ({type(exc).__name__}: "
                                    f"{str(exc)[:80]}); make the zip again", status=422) from None
            check_type(info.filename, body)
            contents.append((info.filename, body))
    return [write_new_file(folder, name, body) for name, body in contents]
