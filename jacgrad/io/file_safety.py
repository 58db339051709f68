"""The edges of a network file: which suffixes mean what, opening regular files only, writing by a
temporary file and a rename, and errors that name the file and clip what they echo.

- ``checked_suffix(path, valid, verb)``: the suffix, compared case-insensitively; the file is
  written at exactly the path given (nothing is appended), an unknown suffix is a ``ValueError``
  naming the valid ones.
- ``open_regular(path)``: a binary file object for a regular file (after resolving symlinks);
  a FIFO, a device, a socket or a directory is a ``ValueError`` (a FIFO would block forever).
- ``atomic_write(path, write)``: ``write(f)`` into a temporary file in the same folder, then
  ``os.replace``: a save that fails partway (disk full) leaves the previous file as it was and no
  temporary file behind.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

__all__ = ["NetworkFileError", "NetworkFileKeyError", "atomic_write", "checked_suffix", "clip", "open_regular", "quote"]

MAX_ECHO = 80  # characters of a file's own text (a key, a name) that an error message repeats


class NetworkFileError(ValueError):
    """A network file that cannot be read or written as asked; the message names the file."""


class NetworkFileKeyError(NetworkFileError, KeyError):
    """An unknown name in a file (a layer kind, an activation): a ``ValueError`` as every file
    problem is, and a ``KeyError`` as jacgrad's unknown names are."""

    __str__ = ValueError.__str__  # the message as written, not KeyError's repr of it


def quote(text) -> str:
    """``repr`` of ``text`` cut to ``MAX_ECHO`` characters, with "…" and the full length when cut."""
    text = text if isinstance(text, str) else str(text)
    if len(text) <= MAX_ECHO:
        return repr(text)
    return f"{text[:MAX_ECHO]!r}… ({len(text):,} characters)"


def clip(message: str, limit: int = 2 * MAX_ECHO) -> str:
    """The first line of another library's error message, cut to ``limit`` characters."""
    lines = str(message).strip().splitlines()
    first = lines[0] if lines else ""
    return first if len(first) <= limit else first[:limit] + "…"


def checked_suffix(path, valid: tuple, verb: str) -> str:
    """The lower-cased suffix of ``path`` if it is one of ``valid``, else a ``NetworkFileError``."""
    suffix = Path(os.fspath(path)).suffix
    if suffix.lower() not in valid:
        listing = ", ".join(valid) if len(valid) > 2 else " or ".join(valid)
        raise NetworkFileError(f"network file {os.fspath(path)!r}: unknown suffix {quote(suffix)}; jacgrad {verb} "
                               f"{listing} (the suffix picks the format, in upper or lower case)")
    return suffix.lower()


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "not a regular file"


def open_regular(path):
    """``open(path, "rb")`` for a regular file only, checked without blocking: ``os.stat`` (through
    symlinks) first, then the descriptor opened non-blocking and ``fstat``-ed to be that same file.
    A missing file is a ``FileNotFoundError``; anything but a regular file a ``NetworkFileError``."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"network file {path!r} does not exist") from None
    except OSError as exc:
        raise NetworkFileError(f"network file {path!r} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise NetworkFileError(f"network file {path!r} is {_kind(st.st_mode)}; jacgrad reads network files "
                               f"from regular files only")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise NetworkFileError(f"network file {path!r} cannot be read: {exc.strerror}") from None
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise NetworkFileError(f"network file {path!r} was replaced while it was opened; jacgrad reads "
                                   f"network files from regular files only")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def atomic_write(path, write) -> None:
    """Call ``write(f)`` on a new temporary file beside ``path`` (through a symlink: beside the file
    it names, which is replaced and the link kept), then rename it over ``path``. Whatever fails,
    the temporary file is removed and the previous file is untouched. The new file keeps the old
    one's permission bits (a new one gets the umask's)."""
    path = os.fspath(path)
    target = os.path.realpath(path)
    old = None
    try:
        old = os.stat(target)
    except FileNotFoundError:
        pass
    if old is not None and not stat.S_ISREG(old.st_mode):
        raise NetworkFileError(f"cannot write {path!r}: it is {_kind(old.st_mode)}, not a regular file")
    folder, name = os.path.split(target)
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            if old is not None:
                os.chmod(tmp, stat.S_IMODE(old.st_mode))
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
