"""Mixture-of-experts layers built from BTT cores (rank index = expert index)."""

from .dispatch import (
    btt_dense,
    btt_moe_masked,
    btt_moe_sparse,
    check_experts,
    dense_gates,
    grouped_mm_available,
    route,
)

__all__ = [
    "route",
    "dense_gates",
    "check_experts",
    "btt_dense",
    "btt_moe_masked",
    "btt_moe_sparse",
    "grouped_mm_available",
]

from .layer import BTTMoE, from_structure, moe_aux_loss, near_square_factors  # noqa: E402

from .chunked import btt_moe_chunked  # noqa: E402

__all__ += ["BTTMoE", "from_structure", "moe_aux_loss", "near_square_factors",
            "btt_moe_chunked"]
