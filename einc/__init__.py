"""einc: a symbolic structure compiler for efficient linear layers.

Stages, each a module or subpackage, in the order data flows through them:
``syntax`` (spec text -> IR), ``ir``, ``analysis`` (exact counts and taxonomy),
``space`` (enumerate and rank structures), ``codegen`` (plans and emitted source),
``runtime`` (torch modules), ``moe`` (BTT-MoE), ``kernels`` (GPU kernels),
``experiments`` (training harness).
"""
from .analysis import analyze
from .errors import (CompileError, EincError, SizeError, SpecSyntaxError, SpecTypeError,
                     StructureError, UnknownNameError)
from .ir import Structure
from .syntax import parse

__version__ = "0.1.0"

# Later stages import torch; load them on first use so `einc analyze` starts fast.
_LAZY = {
    "compile": "einc.runtime", "StructuredLinear": "einc.runtime",
    "replace_linear": "einc.runtime", "param_groups": "einc.runtime",
    "BTTMoE": "einc.moe", "moe_aux_loss": "einc.moe",
    "search": "einc.space",
    "experiments": "einc.experiments",
}
# the stages that import torch, as attributes too (einc.moe.route after `import einc`)
_SUBPACKAGES = {name: f"einc.{name}" for name in ("codegen", "runtime", "moe", "kernels", "space")}


def __getattr__(name):
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(_SUBPACKAGES[name])
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        return module if module.__name__.endswith(name) else getattr(module, name)
    raise AttributeError(f"module 'einc' has no attribute {name!r}")


__all__ = ["parse", "analyze", "Structure", "EincError", "SpecSyntaxError", "SpecTypeError",
           "StructureError", "SizeError", "UnknownNameError", "CompileError", *_LAZY]
