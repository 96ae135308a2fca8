"""ComfyUI's own input checks, for the pack's nodes that have a validate_inputs: a dropdown value must be one of its
options, a number within its min and max.

ComfyUI skips both checks for every input a node's validate_inputs takes, and (0.3.75) never checks a V3 dropdown
at all; so each such node calls `check_inputs`, leaving out only the inputs whose missing file its execute reports
with where to put it (a workflow from another machine)."""

from __future__ import annotations

from typing import Any

from comfy_api.v0_0_2 import io

SHOWN_OPTIONS = 12


def check_inputs(node: type[io.ComfyNode], values: dict[str, Any], *, later: tuple[str, ...] = ()) -> bool | str:
    """True, or one message naming every input whose value is not allowed."""
    problems = [problem for spec in node.define_schema().inputs if spec.id not in later and spec.id in values
                for problem in [input_problem(spec, values[spec.id])] if problem]
    return "; ".join(problems) if problems else True


def input_problem(spec: io.Input, value: Any) -> str:
    if isinstance(spec, io.Combo.Input) and spec.options is not None and value not in spec.options:
        shown = ", ".join(map(repr, spec.options[:SHOWN_OPTIONS])) + (", ..." if len(spec.options) > SHOWN_OPTIONS
                                                                      else "")
        return f"`{spec.id}`: {value!r} is not one of its choices ({shown})"
    if isinstance(spec, (io.Int.Input, io.Float.Input)) and isinstance(value, (int, float)):
        if value != value:
            return f"`{spec.id}`: NaN is not a number"
        if spec.min is not None and value < spec.min:
            return f"`{spec.id}`: {value} is below its minimum {spec.min}"
        if spec.max is not None and value > spec.max:
            return f"`{spec.id}`: {value} is above its maximum {spec.max}"
    return ""
