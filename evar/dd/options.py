"""The few-step flags of `evar sample` and `evar eval` (one definition, one help text; light to import)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

DDSteps = Annotated[Optional[int], typer.Option(
    "--steps", help="DD model: forward passes of the student (1 or 2; 2 without --t-list puts the second at S // 2)")]
DDTList = Annotated[Optional[str], typer.Option(
    "--t-list", help="DD model: how many scales each step is given, e.g. 0 (one step) or 0,3 (two steps)")]
DDTeacher = Annotated[Optional[str], typer.Option(
    "--teacher", help="DD model: the VAR that decodes --teacher-scales (teacher-involved sampling)")]
DDTeacherScales = Annotated[Optional[str], typer.Option(
    "--teacher-scales", help="DD model: consecutive scales the teacher decodes with --cfg/--top-k/--top-p, e.g. 3 "
                             "or 2,3; the student then predicts the scales after them")]
