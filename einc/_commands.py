"""Imports the modules that register sub-commands of the ``einc`` CLI."""
import contextlib

for _name in ("einc.codegen.cli", "einc.space.cli", "einc.experiments.cli"):
    with contextlib.suppress(ModuleNotFoundError):
        __import__(_name)
