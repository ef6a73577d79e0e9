"""The memory planner: fit a fine-tuning method into a machine, before loading a single weight."""

from lowmem_ft.planner.build import PLANNED_AS_GIVEN, PlanResult, build_plan, planned_as_given
from lowmem_ft.planner.plan import Component, Plan, PlanRequest, make_plan
from lowmem_ft.planner.report import render_plan
from lowmem_ft.planner.shapes import ModelShape, read_config, shape_from_config

__all__ = [
    "PLANNED_AS_GIVEN",
    "Component",
    "ModelShape",
    "Plan",
    "PlanRequest",
    "PlanResult",
    "build_plan",
    "make_plan",
    "planned_as_given",
    "read_config",
    "render_plan",
    "shape_from_config",
]
