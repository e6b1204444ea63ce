"""Imports the modules that register sub-commands of the ``einc`` CLI."""
import importlib

for _name in ("einc.codegen.cli", "einc.space.cli", "einc.experiments.cli"):
    try:
        importlib.import_module(_name)
    except ModuleNotFoundError as e:  # a stage left out of a slim install, not a broken one
        if e.name != _name:
            raise
