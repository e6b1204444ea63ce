"""einc: a symbolic structure compiler for efficient linear layers.

Stages, each a module or subpackage: ``parse`` (spec text -> IR), ``ir``, ``analysis``
(exact counts and taxonomy), ``space`` (search), ``codegen``/``runtime`` (torch modules).
"""
from .analysis import analyze
from .errors import (CompileError, EincError, SizeError, SpecSyntaxError, StructureError,
                     UnknownNameError)
from .ir import Structure
from .syntax import parse

__version__ = "0.1.0"

__all__ = ["parse", "analyze", "Structure", "EincError", "SpecSyntaxError", "StructureError",
           "SizeError", "UnknownNameError", "CompileError"]
