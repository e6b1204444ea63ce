"""The ``einc`` command line. Errors print as one message with a caret and exit with status 2."""
from __future__ import annotations

import argparse
import errno
import os
import sys

from .errors import EincError, SizeError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors also exit 2, with a short message
        self.print_usage(sys.stderr)
        self.exit(2, f"einc: error: {message}\n")


def _add_width(p):
    from .sizes import MAX_SIZE
    from .space.checks import int_at_least

    # checked here, so that a bad width names the option typed (--d, not d_in)
    width = int_at_least(1, MAX_SIZE)
    p.add_argument("--d", type=width, help="width of a square layer (d_in = d_out = d), "
                   "at most 2^32")
    p.add_argument("--d-in", type=width, help="input width, at most 2^32")
    p.add_argument("--d-out", type=width, help="output width, at most 2^32")
    p.add_argument("--tolerance", type=float, default=0.15,
                   help="largest padding accepted, as a fraction (default 0.15)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="einc", description="A symbolic structure compiler for efficient "
                     "linear layers.")
    parser.add_argument("--version", action="version", version=f"einc {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("analyze", help="parameters, FLOPs and taxonomy of a structure")
    p.add_argument("spec", help='a structure: "ga,gafr,fgre->fe with ...", a theta point '
                   '"(0.5|0|0.5|0|0.5|0.5|0)" or a preset such as btt')
    _add_width(p)
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(run=_analyze)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


def _analyze(args) -> int:
    from .analysis import analyze

    report = analyze(args.spec, args.d, d_in=args.d_in, d_out=args.d_out,
                     tolerance=args.tolerance)
    print(report.to_json(indent=2) if args.json else report)
    return 0


#: Other stages add their sub-commands here (``einc compile``, ``einc search`` ...).
_EXTRA_COMMANDS: list = []


def command(register):
    _EXTRA_COMMANDS.append(register)
    return register


def main(argv=None) -> int:
    from . import _commands  # noqa: F401  (registers the sub-commands of later stages)

    if sys.stdout is None:  # started with stdout closed (`einc ... >&-`)
        sys.stdout = _ClosedStdout()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):  # no sub-command: a usage error, as argparse's own
        parser.print_help(sys.stderr)
        return 2
    try:
        if getattr(args, "d", None) is not None and (args.d_in, args.d_out) != (None, None):
            raise SizeError("give either --d or --d-in/--d-out, not both")  # named as typed
        code = args.run(args) or 0
        sys.stdout.flush()  # a full disk or closed pipe shows up here, not at exit
        return code
    except EincError as e:
        print(f"einc: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `einc ... | head`
        _drop_stdout()
        return 0
    except OSError as e:  # e.g. writing the result to a full disk
        _drop_stdout()
        what = f"cannot write to standard output: {e.strerror or e}" if e.filename is None \
            else str(e)
        print(f"einc: {what}", file=sys.stderr)
        return 1


class _ClosedStdout:
    """sys.stdout when the process started without one: a write is an OSError, reported
    as any failed write of the output is."""

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, "it is closed")

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        raise OSError(errno.EBADF, "it is closed")


def _drop_stdout() -> None:
    """Point stdout at the null device, so that the interpreter's final flush of what
    could not be written raises nothing more."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
