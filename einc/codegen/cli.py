"""``einc compile SPEC --d-in N --d-out M -o layer.py``: write a standalone module."""
from __future__ import annotations

import os
import re
import sys
import tempfile

from ..cli import _add_width, command
from ..errors import CompileError


@command
def register(sub):
    p = sub.add_parser("compile", help="write a standalone torch module for a structure")
    p.add_argument("spec", help="a structure (einsum, theta point or preset)")
    _add_width(p)
    p.add_argument("-o", "--output", help="file to write (default: print to stdout)")
    p.add_argument("--class-name", default=None,
                   help="name of the generated class (default: from the spec)")
    p.set_defaults(run=_run)


def class_name_for(spec: str) -> str:
    """A CamelCase class name from the spec's leading word ('btt(rank=2)' -> BttLinear)."""
    word = re.match(r"[A-Za-z][A-Za-z0-9]*", spec.strip())
    base = word.group(0).capitalize() if word and "[" not in spec and "," not in spec.split(
        "with")[0] else "Structured"
    return f"{base}Linear"


def _run(args) -> int:
    from ..analysis import resolve_dims
    from .emit import module_source
    from .lower import as_structure, lower

    s = as_structure(args.spec)
    if s.moe is not None:
        raise CompileError("einc compile writes plain structured layers; a bttmoe spec is "
                           "built in Python with einc.compile / einc.BTTMoE")
    d_in, d_out = resolve_dims(s, args.d, args.d_in, args.d_out)
    low = lower(s, d_in, d_out, args.tolerance)
    name = args.class_name or class_name_for(args.spec)
    if not name.isidentifier():
        raise CompileError(f"--class-name {name!r} is not a Python identifier")
    text = module_source(low, name, args.spec)
    if not args.output:
        sys.stdout.write(text)
        return 0
    # Write to a temporary file and rename: no half-written module is ever left behind.
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise CompileError(f"cannot write {args.output}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, args.output)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"wrote {args.output}: class {name}, {low.d_in} -> {low.d_out}, "
          f"{low.params:,} parameters", file=sys.stderr)
    return 0
