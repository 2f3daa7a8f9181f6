"""hooks/grid.py: GridParametersHook hands the run's `distill` block to the grid when the context is created,
and has the registry's pipelines built again when the grid changed."""

from __future__ import annotations

from types import SimpleNamespace

from kedro.framework import project
from kedro.framework.project import configure_project

from warmup_distill_kedro import grid
from warmup_distill_kedro.grid import Cell
from warmup_distill_kedro.hooks.grid import GridParametersHook


def _context(distill: dict | None) -> SimpleNamespace:
    parameters = {"probe": {"n_samples": 2}} if distill is None else {"distill": distill}
    return SimpleNamespace(config_loader={"parameters": parameters})


def test_the_runs_distill_block_shapes_the_grid(use_grid):
    use_grid(["vanilla"], ["fkl"])
    GridParametersHook().after_context_created(
        _context({"variants": ["control"], "objectives": ["sft", "js"]})
    )
    assert grid.cells() == [Cell("control", "sft"), Cell("control", "js")]
    GridParametersHook().after_context_created(_context(None))  # no distill block: the defaults
    assert len(grid.cells()) == len(grid.DEFAULT_VARIANTS) * len(grid.DEFAULT_OBJECTIVES)


def test_a_changed_grid_rebuilds_the_registrys_pipelines(use_grid):
    configure_project("warmup_distill_kedro")
    hook = GridParametersHook()
    hook.after_context_created(_context({"variants": ["vanilla"], "objectives": ["fkl"]}))
    assert {n.name for n in project.pipelines["distill"].nodes} == {
        "prepare_kd_examples",
        "vanilla.fkl.distill_vanilla_fkl",
    }
    hook.after_context_created(_context({"variants": ["control"], "objectives": ["sft"]}))
    assert {n.name for n in project.pipelines["distill"].nodes} == {
        "prepare_kd_examples",
        "prepare_sft_examples",
        "control.sft.distill_control_sft",
    }
    evaluated = {n.namespace for n in project.pipelines["evaluate"].nodes}
    assert evaluated == {"teacher", "control.before_kd", "control.sft"}
