"""One line for an operating-system error, and the exit status it deserves.

A path the user gave that cannot be used (missing, a file where a directory belongs, read-only,
no permission) is bad input: exit 2. Anything else the system refused (a full disk, an I/O
error) is a failure of the run: exit 1. Either way the user sees one line naming the path.
"""

from __future__ import annotations

import errno

_BAD_INPUT = {
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENAMETOOLONG,
    errno.ELOOP,
}


def os_error_line(exc: OSError) -> tuple[str, int]:
    """``(message, exit status)`` for ``exc``."""
    where = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    reason = exc.strerror or str(exc)
    hint = {
        errno.ENOTDIR: "a file is in the way where a directory is needed",
        errno.EEXIST: "a file is in the way where a directory is needed",
        errno.EISDIR: "a directory was given where a file is needed",
        errno.EROFS: "the file system is read-only",
        errno.ENOSPC: "the disk is full; free space and resume",
    }.get(exc.errno or 0)
    text = f"{where}: {reason}" if where else reason
    if hint:
        text += f" ({hint})"
    return text, 2 if exc.errno in _BAD_INPUT else 1
