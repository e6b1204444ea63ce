"""Stage 5: torch modules for structures (StructuredLinear, BTT-MoE), init and surgery."""
from .module import ROUTES, StructuredLinear
from .api import compile, param_groups, replace_linear, ReplaceReport

__all__ = ["StructuredLinear", "compile", "replace_linear", "param_groups", "ReplaceReport",
           "ROUTES"]
