"""GPU kernels for structured linear layers.

``strided_bmm`` is a batched matmul whose operands and result are addressed
through arbitrary multi-axis strides, so a chain of contractions runs without
permute copies; ``slot_rows`` moves rows between tokens and the padded expert slots of a
sparse BTT-MoE. Triton is optional: it is imported on first use, and pure-torch
equivalents are used when it is missing.
"""

from .strided_bmm import (
    MAX_GROUP_AXES,
    TUNING_MODES,
    StridedBmmFunction,
    StridedBmmSpec,
    contiguous_strides,
    strided_bmm,
    strided_bmm_reference,
    set_tuning,
    triton_available,
    tuning,
)

__all__ = [
    "MAX_GROUP_AXES",
    "TUNING_MODES",
    "StridedBmmFunction",
    "StridedBmmSpec",
    "contiguous_strides",
    "strided_bmm",
    "strided_bmm_reference",
    "set_tuning",
    "triton_available",
    "tuning",
]
