"""``einc compile SPEC --d-in N --d-out M -o layer.py``: write a standalone module."""
from __future__ import annotations

import os
import stat
import sys

from ..cli import _add_width, command
from ..errors import CompileError
from ..files import replace_file


@command
def register(sub):
    p = sub.add_parser("compile", help="write a standalone torch module for a structure")
    p.add_argument("spec", help="a structure (einsum, theta point or preset)")
    _add_width(p)
    p.add_argument("-o", "--output", help="file to write (default: print to stdout)")
    p.add_argument("--class-name", default=None,
                   help="name of the generated class (default: from the spec)")
    p.set_defaults(run=_run)


def class_name_for(s) -> str:
    """A CamelCase class name from the preset a structure came from ('btt(rank=2, cores=3)'
    -> BttLinear); StructuredLinear for an einsum or a theta point."""
    from ..presets import PRESETS

    base = s.origin.capitalize() if s.origin in PRESETS else "Structured"
    return f"{base}Linear"


def _run(args) -> int:
    from ..analysis import resolve_dims
    from .emit import check_class_name, module_source
    from .lower import as_structure, lower

    s = as_structure(args.spec)
    if s.moe is not None:
        raise CompileError("einc compile writes plain structured layers; a bttmoe spec is "
                           "built in Python with einc.compile / einc.BTTMoE")
    d_in, d_out = resolve_dims(s, args.d, args.d_in, args.d_out)
    low = lower(s, d_in, d_out, args.tolerance)
    name = class_name_for(s) if args.class_name is None else args.class_name
    check_class_name(low, name, "--class-name")
    text = module_source(low, name, args.spec)
    if args.output == "":
        raise CompileError("-o/--output is empty: give a file to write, or leave -o out to "
                           "print the module to standard output")
    if args.output is None:
        _write_stdout(text)
        return 0
    _write_file(args.output, text)
    print(f"wrote {args.output}: class {name}, {low.d_in} -> {low.d_out}, "
          f"{low.params:,} parameters", file=sys.stderr)
    return 0


def _write_stdout(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError:
        # The unwritten text stays buffered and the interpreter's final flush would fail
        # again, with a traceback-like message: let that flush go to the null device.
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())
            os.close(null)
        except (OSError, ValueError):
            pass
        raise  # reported by einc.cli.main, as for every command (`| head`: not an error)


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"))


def _write_file(path: str, text: str) -> None:
    """Replace ``path`` atomically: write a temporary file beside it, then rename, so that
    no half-written module is ever left behind. Only a regular file is replaced (through a
    symlink: its target, keeping the link), and it keeps its mode; a new file gets the mode
    open() would give it (0o666 less the umask)."""
    if path.endswith(("/", os.sep)) or os.path.basename(path) in ("", ".", ".."):
        raise CompileError(f"cannot write {path}: it names a folder; -o takes a file path")
    target = os.path.realpath(path)
    try:
        # the path itself, links followed: realpath cannot name every target (/dev/stdout
        # on a pipe resolves to "pipe:[...]")
        old = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        old = None
    except OSError as e:  # e.g. a symlink loop
        raise CompileError(f"cannot write {path}: {e.strerror or e}") from None
    if old is not None and not stat.S_ISREG(old.st_mode):
        kind = next((k for test, k in _KINDS if test(old.st_mode)), "not a regular file")
        via = f" ({target})" if target != os.path.abspath(path) else ""
        raise CompileError(f"cannot write {path}: it is {kind}{via}; -o only creates or "
                           "replaces regular files")
    # renaming over a file needs only the folder's permission: refuse a file that open()
    # could not write either
    if old is not None and not os.access(target, os.W_OK):
        raise CompileError(f"cannot write {path}: the file is read-only; make it writable "
                           "or choose another -o")
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        why = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise CompileError(f"cannot write {path}: folder {folder} {why}")
    try:
        replace_file(target, lambda fh: fh.write(text))  # keeps the mode of a file replaced
    except OSError as e:
        raise CompileError(f"cannot write {path}: {e.strerror or e}") from None
