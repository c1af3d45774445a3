"""What sits under a checkpoint's name but is no checkpoint: a Git LFS pointer (a clone made without git-lfs), a saved
web page or a JSON error body (a download that got the server's answer instead of the file), other text, nothing at
all. Told from the first bytes alone, before any checkpoint reader misreads them as a header length or a pickle.

No checkpoint format begins with text: a torch zip begins with `PK\\x03\\x04`, a torch pickle with the PROTO opcode
`\\x80`, a safetensors file with its header's 8-byte little-endian length (a NUL among them for any length a reader
accepts), a DCP `.metadata` with `\\x80` too.
"""

from __future__ import annotations

import html
import json
import os
import re
import shlex

from ckpttool.errors import CkptError
from ckpttool.model import Checkpoint, Code

HEAD = 1024  # bytes looked at: git-lfs's pointer files are under 1024 bytes (its spec), a page's <title> near the top
JSON_LIMIT = 1 << 20  # a JSON body longer than this is named as JSON without being parsed
LFS_VERSIONS = (b"version https://git-lfs.github.com/spec/", b"version https://hawser.github.com/spec/")
TITLE = re.compile(r"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)
MESSAGE_KEYS = "error message detail msg errors".split()  # where a JSON error body says what went wrong


def _head(path: str) -> bytes:
    """The first bytes of a regular file (a FIFO or device under a checkpoint's name is left to the readers'
    refusal, never opened here)."""
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return b""
        with open(path, "rb") as f:
            return f.read(HEAD)
    except OSError:
        return b""


def _text(head: bytes) -> str | None:
    """`head` as text, where it is text: UTF-8 (a character cut at the end allowed), no NUL or other control bytes but
    whitespace."""
    text = head.decode("utf-8", errors="ignore" if len(head) == HEAD else "strict") if head else ""
    if not text or len(text.encode("utf-8")) < len(head) - 3:
        return None
    if any(ord(c) < 32 and c not in "\t\n\r\f" for c in text):
        return None
    return text


PICKLE_WINDOW = 1 << 20  # bytes of a text file parsed as protocol-0 pickle opcodes


def detect(path: str) -> bool:
    """Whether the file at `path`, given as the checkpoint, is text (an LFS pointer among it) or empty rather than
    any checkpoint format."""
    return _empty(path) or is_text(path)


def is_text(path: str) -> bool:
    """Whether the file at `path` is text (an LFS pointer among it) rather than any checkpoint format: a part of a
    checkpoint is asked this (an empty part is its reader's `truncated`). A protocol-0 pickle is text too: it is left
    to the torch readers (which check what it would import)."""
    try:
        head = _head(path)
        text = _text(head)
    except UnicodeDecodeError:
        return False
    if head.startswith(LFS_VERSIONS):
        return True
    return text is not None and not _is_pickle(path)


def _empty(path: str) -> bool:
    try:
        return os.path.isfile(path) and os.path.getsize(path) == 0
    except OSError:
        return False


def _is_pickle(path: str) -> bool:
    """Whether the file parses as pickle opcodes to its STOP, or to the end of the first PICKLE_WINDOW bytes."""
    import io
    import pickletools

    with open(path, "rb") as f:
        window = io.BytesIO(f.read(PICKLE_WINDOW))
    try:
        for op, _, _ in pickletools.genops(window):
            if op.name == "STOP":
                return True
    except Exception:  # noqa: BLE001 - text that is no pickle fails on its first bytes, in many ways
        return window.tell() >= PICKLE_WINDOW
    return True


def read(path: str, *, role: str | None = None, name: str | None = None) -> Checkpoint:
    """Never a checkpoint: raises CkptError saying what the file is and what to do instead."""
    raise describe(path)


def describe(path: str) -> CkptError:
    """The error for the text file at `path`: `lfs_pointer` with its oid and size, else `not_a_checkpoint` naming what
    it is (a web page and its title, a JSON body and its message, text and its first line)."""
    head = _head(path)
    base = os.path.basename(path)
    if _empty(path):
        return CkptError(Code.NOT_A_CHECKPOINT, "an empty file (0 bytes), not a checkpoint: the save or download that "
                         "made it wrote nothing (a disk that filled, a copy or download stopped at once); save or "
                         "fetch it again", path)
    if head.startswith(LFS_VERSIONS):
        fields = dict(line.partition(" ")[::2] for line in head.decode("utf-8", "replace").splitlines() if " " in line)
        oid, size = fields.get("oid", "?"), fields.get("size", "")
        size_words = f" of {int(size):,} bytes" if re.fullmatch(r"[0-9]{1,20}", size) else ""
        return CkptError(Code.LFS_POINTER, f"a Git LFS pointer (oid {oid[:80]}{size_words}), not the file itself: the "
                         "repository was cloned without git-lfs. Run `git lfs install && git lfs pull` in the clone, "
                         f"or download the file (`hf download REPO {shlex.quote(base)}` for a Hugging Face repo)",
                         path)
    text = _text(head) or ""
    stripped = text.lstrip("\ufeff \t\r\n")
    size = os.path.getsize(path)
    redownload = "download it again (an expired link, a private repo without a token or a wrong URL gives such a body)"
    if re.match(r"<(!doctype\s+html|html|head|body|\?xml)", stripped, re.IGNORECASE) or "<html" in text.lower():
        title = TITLE.search(text)
        what = f"a web page titled {_short(html.unescape(title.group(1)))!r}" if title else "a web page (HTML)"
        return CkptError(Code.NOT_A_CHECKPOINT, f"{what}, {size:,} bytes, not a checkpoint: the download saved the "
                         f"server's page instead of the file; {redownload}", path)
    if stripped[:1] in "{[":
        message = _json_message(path, size)
        what = f"a JSON body ({message})" if message else "a JSON document"
        return CkptError(Code.NOT_A_CHECKPOINT, f"{what}, {size:,} bytes, not a checkpoint: {redownload}", path)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return CkptError(Code.NOT_A_CHECKPOINT, f"a text file, {size:,} bytes, beginning {_short(first)!r}, not a "
                     "checkpoint (no checkpoint format is text); check that the path names the checkpoint", path)


def _json_message(path: str, size: int) -> str | None:
    """The error message a JSON body carries (`{"error": "Repository Not Found ..."}`), where it is short enough to
    read and says one."""
    if size > JSON_LIMIT:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    for key in MESSAGE_KEYS:
        value = doc.get(key)
        if isinstance(value, dict):
            value = next((value[k] for k in MESSAGE_KEYS if isinstance(value.get(k), str)), None)
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, (str, int, float)) and str(value):
            return f"{key}: {_short(str(value))!r}"
    return None


def _short(text: str, limit: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
