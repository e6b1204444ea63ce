"""Output files replaced atomically: written to a temporary file beside the target, then
renamed over it, so that a full disk or an interrupted run never leaves a half-written file
(only the old one, or none)."""
from __future__ import annotations

import os
import secrets
from typing import IO, Callable, Optional

from .errors import EincError


def replace_file(path: str, write: Callable[[IO], None], binary: bool = False,
                 mode: Optional[int] = None) -> None:
    """Call ``write`` on a new temporary file in ``path``'s folder, then rename it to
    ``path``. A new file gets the mode open() would give it (0o666 less the umask), or
    ``mode``. On any failure the temporary file is removed and the error propagates
    (an OSError from the file system as it is)."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name[:64]}.{secrets.token_hex(8)}.tmp")
    # O_EXCL with mode 0o666: the kernel applies the umask (and default ACLs) as for any
    # new file, where mkstemp would force 0o600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as fh:
            write(fh)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


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
