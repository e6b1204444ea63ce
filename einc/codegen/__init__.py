"""Stage 4: lowering a structure at concrete sizes to planned bmm steps, and emitting source."""
from .lower import Lowered, lower
from .plan import Plan, StepPlan

__all__ = ["lower", "Lowered", "Plan", "StepPlan"]
