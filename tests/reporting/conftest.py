"""The report's evaluations and their table, shared by the table and Markdown tests."""

from __future__ import annotations

import pytest

from tests.helpers import REPORT_OBJECTIVES, REPORT_VARIANTS, evaluation
from warmup_distill_kedro.reporting.records import evaluation_records
from warmup_distill_kedro.reporting.table import build_table


@pytest.fixture
def evaluations():
    """A grid of REPORT_VARIANTS x REPORT_OBJECTIVES with three cells measured, and the reference rows."""
    return {
        "teacher": evaluation("teacher", "teacher", "teacher", 0.90, (0.60, 0.61, 0.62), kl=None),
        "student": evaluation("student", "vanilla", "before_kd", 0.30, (0.40, 0.41, 0.42)),
        "warmup_student": evaluation("warmup_student", "warmup", "before_kd", 0.28, (0.38, 0.39, 0.40)),
        "vanilla.fkl": evaluation("vanilla.fkl", "vanilla", "fkl", 0.40, (0.50, 0.51, 0.52), kl=0.125),
        "warmup.fkl": evaluation("warmup.fkl", "warmup", "fkl", 0.44, (0.50, 0.52, 0.54), kl=0.12),
        "vanilla.rkl": evaluation("vanilla.rkl", "vanilla", "rkl", 0.41, (0.50, 0.51, 0.52)),
    }


@pytest.fixture
def table(evaluations):
    return build_table(evaluation_records(evaluations), REPORT_VARIANTS, REPORT_OBJECTIVES)
