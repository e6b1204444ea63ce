"""Checks made before any expensive work: output folders (``einc search --plot DIR``,
``einc experiment scaling --out DIR``) and argparse value types for counts and lists, so
that bad input fails at once with a message naming the option (exit status 2)."""
from __future__ import annotations

import argparse
import math
import numbers
import os

import numpy as np

from ..errors import EincError


def prepare_folder(path, what: str = "output folder") -> list[str]:
    """Make sure ``path`` is a folder this process can write to, creating it (and missing
    parents) if needed. Returns the folders created, outermost first, so that a caller whose
    later checks fail can take them back with :func:`remove_folders`. Raises an
    :class:`~einc.errors.EincError` naming ``what`` when the path is a file, sits under a
    file, or cannot be created or written."""
    if not isinstance(path, (str, os.PathLike)):
        raise EincError(f"the {what} must be a path (a str or os.PathLike), got {shown(path)}")
    path = os.fspath(path)
    if not path:
        raise EincError(f"the {what} is an empty path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise EincError(f"the {what} {path!r} exists and is not a folder")
    missing, p = [], os.path.abspath(path)
    while not os.path.isdir(p):
        if os.path.lexists(p):
            raise EincError(f"cannot create the {what} {path!r}: {p!r} is not a folder")
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    created: list[str] = []
    try:
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
            except FileExistsError:
                if os.path.isdir(folder):  # made meanwhile by another process (torchrun)
                    continue
                raise
            created.append(folder)
    except OSError as e:
        remove_folders(created)
        raise EincError(f"cannot create the {what} {path!r}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        remove_folders(created)
        raise EincError(f"cannot write to the {what} {path!r}: permission denied")
    return created


def check_targets(folder, names, what: str = "output folder") -> None:
    """Refuse, before any work, a file the run will write in ``folder`` whose name is taken
    by something that is not a file (a folder named ``table.md``): the write would fail
    at the end, after the other files were written."""
    for name in names:
        path = os.path.join(os.fspath(folder), name)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise EincError(f"the {what} {os.fspath(folder)!r} holds {name!r}, which is not a "
                            "file, where that file goes: remove or rename it")


def remove_folders(created) -> None:
    """Remove folders :func:`prepare_folder` created, innermost first, if still empty."""
    for folder in reversed(list(created)):
        try:
            os.rmdir(folder)
        except OSError:
            pass


# -- limits of a training run (einc experiment scaling, einc search --train) ----------------
# Far beyond any run that finishes, so that a slip of the keyboard is refused at once instead
# of failing to allocate (or overflowing) later.
MAX_TRAIN_WIDTH = 2 ** 20
MAX_STEPS = 10 ** 9
MAX_BATCH = 2 ** 20
MAX_EVAL_POINTS = 10_000
MAX_SEEDS = 1_000         # seeds per run
MAX_SEED = 2 ** 64 - 1    # the largest seed torch.manual_seed takes


# -- messages -------------------------------------------------------------------------------

def bounds_text(minimum: int, most: int | None = None) -> str:
    return f">= {minimum}" + ("" if most is None else f" and <= {most:,}")


def flag(value, name: str, none: str = ""):
    """``value`` as a bool; None too when ``none`` says what None means."""
    if value is None and none:
        return None
    if not isinstance(value, (bool, np.bool_)):
        allowed = f"True, False or None ({none})" if none else "True or False"
        raise EincError(f"{name} must be {allowed}, got {shown(value)}")
    return bool(value)


def shown(value) -> str:
    """``value`` for a message: a huge number shortened (repr refuses 4,300+ digits)."""
    if isinstance(value, numbers.Rational) and not isinstance(value, bool):
        from ..sizes import short
        return short(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:50] + "..."


# -- argparse value types -------------------------------------------------------------------

def _int(text: str) -> int:
    return int(str(text).strip().replace("_", ""))


def int_at_least(minimum: int, most: int | None = None):
    """An argparse ``type``: an integer >= ``minimum`` (and <= ``most``)."""
    def parse(text):
        try:
            value = _int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"takes an integer {bounds_text(minimum, most)}, "
                                             f"got {shown(text)}")
        return value
    parse.__name__ = f"integer {bounds_text(minimum, most)}"
    return parse


def int_list(minimum: int, most: int | None = None):
    """An argparse ``type``: comma-separated integers, each >= ``minimum`` (and <= ``most``)."""
    def parse(text):
        try:
            values = [_int(v) for v in str(text).split(",") if v.strip()]
        except ValueError:
            values = None
        if not values or any(v < minimum or (most is not None and v > most) for v in values):
            raise argparse.ArgumentTypeError(f"takes comma-separated integers "
                                             f"{bounds_text(minimum, most)} (for example "
                                             f"64,128,256), got {shown(text)}")
        return values
    parse.__name__ = "integer list"
    return parse


def _positive(text) -> float | None:
    try:
        value = float(str(text).strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def positive_float(text):
    """An argparse ``type``: a finite number > 0."""
    value = _positive(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"takes a number > 0 (for example 3e-3), got {text!r}")
    return value


def positive_float_list(text):
    """An argparse ``type``: comma-separated finite numbers > 0."""
    parts = [v for v in str(text).split(",") if v.strip()]
    values = [_positive(v) for v in parts]
    if not values or any(v is None for v in values):
        raise argparse.ArgumentTypeError("takes comma-separated numbers > 0 (for example "
                                         f"1e-3,3e-3,1e-2), got {text!r}")
    return values
