"""Output files replaced atomically: written to a temporary file beside the target, then
renamed over it, so that a full disk or an interrupted run never leaves a half-written file
(only the old one, or none)."""
from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from typing import IO, Callable, Optional

from .errors import EincError

_TMP = re.compile(r"^\..+\.[0-9a-f]{16}\.tmp$")  # the names replace_file gives its temporaries


def replace_file(path: str, write: Callable[[IO], None], binary: bool = False,
                 mode: Optional[int] = None) -> None:
    """Call ``write`` on a new temporary file beside ``path``, then rename it over ``path``.
    A symlink is written through (its target is replaced, the link kept); a file replaced
    keeps its mode, a new one gets the mode open() would give it (0o666 less the umask),
    unless ``mode`` is given. A read-only file is refused as open() would refuse it. On any
    failure the temporary file is removed and the error propagates (an OSError from the
    file system as it is)."""
    target = os.path.realpath(path)
    try:
        old = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        old = None
    if old is not None and not stat.S_ISREG(old.st_mode):  # a folder, a device, a FIFO
        raise OSError(errno.EINVAL, "not a regular file", path)
    if old is not None:
        # renaming over a file needs only the folder's permission
        if not os.access(target, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        if mode is None:
            mode = stat.S_IMODE(old.st_mode)
    folder, name = os.path.split(target)
    tmp = os.path.join(folder, f".{name[:64]}.{secrets.token_hex(8)}.tmp")
    # O_EXCL with mode 0o666: the kernel applies the umask (and default ACLs) as for any
    # new file, where mkstemp would force 0o600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as fh:
            write(fh)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def sweep_temporaries(folder: str) -> None:
    """Remove temporary files that :func:`replace_file` left in ``folder`` when its process
    was killed mid-write (SIGTERM, SIGKILL: no cleanup runs then). Call it before this
    process writes there."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if _TMP.match(name):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


def write_output(path: str, write: Callable[[IO], None], binary: bool = False) -> None:
    """:func:`replace_file`, a file-system error raised as an EincError naming the file."""
    try:
        replace_file(path, write, binary=binary)
    except OSError as e:
        raise EincError(f"cannot write {path}: {e.strerror or e}") from None


def save_png(fig, path: str) -> str:
    """Save a matplotlib figure as a PNG at ``path`` (atomically, as every output)."""
    write_output(path, lambda fh: fig.savefig(fh, format="png", dpi=120), binary=True)
    return path
