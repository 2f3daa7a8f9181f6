"""The distill grid, defined once: which students start distillation, which objectives train them, and
every model the flow measures. The distill, evaluate and report pipelines, the report's table and plots
and `kedro compare` all take their names from here.

- A *variant* is where a student starts distillation, each a checkpoint of the catalog:
  `vanilla` (`student_model`: the student as bootstrapped or given), `warmup` (`student_warmup`: after
  the warmup stage) and `control` (`student_control`: the fairness control, the vanilla student given
  warmup's extra steps as plain SFT on the same prompts' gold responses).
- A *cell* is a (variant, objective) pair. Its nodes live in the namespace `<variant>.<objective>`, nested
  in the variant's (kedro-viz draws the grid as one box per variant, one per cell inside it), and are
  named after their stage and the cell, the label kedro-viz shows (`vanilla.fkl.distill_vanilla_fkl`,
  `vanilla.fkl.evaluate_vanilla_fkl`; `node_name`); its outputs are named after it
  (`vanilla.fkl.student`, `vanilla.fkl.distill_metrics`, `vanilla.fkl.evaluation_metrics`).
- Each cell is trained once per training seed (`distill.seeds`). With one seed the cell is its one run
  (`vanilla.fkl`); with several, each run is a namespace of its own inside the cell, named after its seed
  (`vanilla.fkl.seed1`: `vanilla.fkl.seed1.student`, node `distill_vanilla_fkl_seed1`), so that every
  seed is a versioned output, a tracked run and a subject of its own, and the report pools them.
- A *subject* is a model the evaluate pipeline measures: the teacher, every variant's student before
  distillation (objective `before_kd`, e.g. `vanilla.before_kd`) and every cell's distilled student.
- Each variant's *results* (`vanilla.results`, written by the node `vanilla.collect_vanilla`) gather what
  its subjects and cells wrote, so that the report reads one input per variant and every cell's outputs
  stay inside the variant's box.

The grid's shape is a parameter (`distill.variants`, `distill.objectives`, overridable with `--params`),
but Kedro builds pipelines without parameters: `hooks.grid.GridParametersHook` hands this module the
run's `distill` block (`use_parameters`) before the registry builds the pipelines. Without it (a bare
`register_pipelines()`) the defaults below apply. The same hook says whether the warmup stage reads the
teacher (`warmup.loss.reference: teacher`), so that the teacher is loaded for it only then.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from warmup_distill_kedro.core.errors import UserInputError
from warmup_distill_kedro.core.kd.cell import BASELINE_OBJECTIVES, CELL_OBJECTIVES, reads_teacher_cache

TEACHER = "teacher"
TEACHER_CHECKPOINT = "teacher_model"
# The objective name of a student measured before distillation (a row of reference in the report).
BEFORE_KD = "before_kd"

# Each variant's starting checkpoint (a catalog dataset).
STARTING_CHECKPOINTS: dict[str, str] = {
    "vanilla": "student_model",
    "warmup": "student_warmup",
    "control": "student_control",
}
VARIANTS: tuple[str, ...] = tuple(STARTING_CHECKPOINTS)
DEFAULT_VARIANTS: tuple[str, ...] = ("vanilla", "warmup")
DEFAULT_OBJECTIVES: tuple[str, ...] = ("fkl", "rkl", "js", "skl", "srkl", "akl", "dskd", "sft")

_parameters: dict[str, Any] = {}
_warmup_reference: list[str] = ["student"]
_handed: list[bool] = [False]  # whether a run (or a test) handed the grid its parameters


def use_parameters(distill: Mapping[str, Any], warmup: Mapping[str, Any] | None = None) -> bool:
    """Take the run's `distill` parameter block as the grid's source, and its `warmup` block's DPO reference;
    True when either changed the pipelines."""
    _handed[0] = True
    current = dict(distill)
    loss = (warmup or {}).get("loss") or {}
    reference = loss.get("reference", "student") if isinstance(loss, Mapping) else "student"
    if current == _parameters and reference == _warmup_reference[0]:
        return False
    _parameters.clear()
    _parameters.update(current)
    _warmup_reference[0] = reference
    return True


def parameters_handed() -> bool:
    """Whether `use_parameters` was called in this process (by the hook of a run, or a test)."""
    return _handed[0]


def warmup_reads_teacher() -> bool:
    """Whether the warmup student's DPO reference is the teacher (DPKD's sequence-level form)."""
    return _warmup_reference[0] == "teacher"


@dataclass(frozen=True)
class Cell:
    """One training run of a (variant, objective) cell of the grid: its training seed, and whether the grid
    has several seeds (then the seed is part of its name)."""

    variant: str
    objective: str
    seed: int = 0
    seeded: bool = False

    @property
    def name(self) -> str:
        """The namespace of the run's nodes and the prefix of its outputs."""
        base = f"{self.variant}.{self.objective}"
        return f"{base}.seed{self.seed}" if self.seeded else base

    @property
    def start(self) -> str:
        """The checkpoint the cell's student starts from."""
        return STARTING_CHECKPOINTS[self.variant]

    @property
    def examples(self) -> str:
        """What the cell trains on: the shared KD set, or the student's gold examples for the baseline."""
        return "sft_examples" if self.objective in BASELINE_OBJECTIVES else "kd_examples"


@dataclass(frozen=True)
class Subject:
    """A model the evaluate pipeline measures, and the checkpoint it is loaded from."""

    variant: str
    objective: str
    checkpoint: str
    # The training seed of a distilled student of a grid with several seeds; None: one model, no seed in
    # its name (the teacher, the students before KD, the cells of a one-seed grid).
    seed: int | None = None

    @property
    def name(self) -> str:
        if self.variant == TEACHER:
            return TEACHER
        base = f"{self.variant}.{self.objective}"
        return base if self.seed is None else f"{base}.seed{self.seed}"


def run_tags(variant: str, objective: str, seed: int | None) -> list[str]:
    """The node tags that say whose run a grid node is (the MLflow hook names and tags its run from them)."""
    return [f"variant.{variant}", f"objective.{objective}", *([f"seed.{seed}"] if seed is not None else [])]


def node_name(stage: str, owner: str) -> str:
    """A grid node's own name: its stage and the cell, subject or variant it belongs to
    (`distill_vanilla_fkl`, `evaluate_teacher`, `collect_vanilla`). Kedro prefixes the namespace
    (`vanilla.fkl.distill_vanilla_fkl`); kedro-viz shows this part alone, so it must say whose node it is."""
    return f"{stage}_{owner.replace('.', '_')}"


def results(variant: str) -> str:
    """The dataset that gathers a variant's evaluations, training metrics and predictions."""
    return f"{variant}.results"


def cells(parameters: Mapping[str, Any] | None = None) -> list[Cell]:
    """Every training run of the grid: variants outermost, then objectives, then seeds, in the order the
    parameters list them."""
    parameters = _parameters if parameters is None else parameters
    variants = name_list(parameters.get("variants", DEFAULT_VARIANTS), "distill.variants", VARIANTS)
    objectives = name_list(
        parameters.get("objectives", DEFAULT_OBJECTIVES), "distill.objectives", CELL_OBJECTIVES
    )
    given = parameters.get("seeds")
    seeds = seed_list([(parameters.get("training") or {}).get("seed", 0)] if given is None else given)
    seeded = len(seeds) > 1
    return [
        Cell(variant, objective, seed, seeded)
        for variant in variants
        for objective in objectives
        for seed in seeds
    ]


def first_seed(grid: Sequence[Cell]) -> list[Cell]:
    """One run per (variant, objective): the grid's first seed (what the explain stage and the KD-curve
    plot look at; the report's numbers pool every seed)."""
    first = grid[0].seed if grid else 0
    return [cell for cell in grid if cell.seed == first]


def seed_list(value: Any) -> list[int]:
    """`distill.seeds`: a list of training seeds, one int, or one string of them separated by spaces (the
    command line's form: `--params 'distill.seeds=0 1 2'`)."""
    seeds = spaced_names(value)
    seeds = [seeds] if isinstance(seeds, int) else seeds
    parsed = [_seed(seed) for seed in seeds] if isinstance(seeds, list | tuple) else []
    if not parsed or None in parsed:
        raise UserInputError(
            f"distill.seeds must be a non-empty list of training seeds (integers >= 0; on the command line: "
            f"separated by spaces, e.g. --params 'distill.seeds=0 1 2'), got {value!r}"
        )
    if len(set(parsed)) != len(parsed):
        raise UserInputError(f"distill.seeds lists a seed twice: {parsed}")
    return parsed


def _seed(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value if isinstance(value, int) and value >= 0 else None


def teacher_cache_readers(grid: Sequence[Cell], parameters: Mapping[str, Any] | None = None) -> list[Cell]:
    """The cells that read the teacher's top-k cache (`distill.teacher_cache.enabled`; token-level
    objectives on fixed text, core.kd.cell.reads_teacher_cache); none when it is off."""
    parameters = _parameters if parameters is None else parameters
    enabled = bool((parameters.get("teacher_cache") or {}).get("enabled", False))
    mode = (parameters.get("data") or {}).get("mode", "off_policy")
    return [cell for cell in grid if reads_teacher_cache(enabled, mode, cell.objective)]


def variants_of(grid: Sequence[Cell]) -> list[str]:
    return list(dict.fromkeys(cell.variant for cell in grid))


def starting_variants(grid: Sequence[Cell]) -> list[str]:
    """The variants whose starting student is measured before KD: the grid's, plus the fairness control
    whenever warmup is in the grid (it is trained beside the warmup student; its row says what warmup's
    extra steps alone would have given)."""
    variants = variants_of(grid)
    if "warmup" in variants and "control" not in variants:
        variants.append("control")
    return variants


def subjects(grid: Sequence[Cell]) -> list[Subject]:
    """Every model the flow measures: the teacher, each variant's student before KD, each cell's student."""
    return [
        Subject(TEACHER, TEACHER, TEACHER_CHECKPOINT),
        *(Subject(v, BEFORE_KD, STARTING_CHECKPOINTS[v]) for v in starting_variants(grid)),
        *(
            Subject(cell.variant, cell.objective, f"{cell.name}.student", cell.seed if cell.seeded else None)
            for cell in grid
        ),
    ]


def spaced_names(value: Any) -> Any:
    """A string of names separated by spaces as their list; any other value as it is."""
    return value.split() if isinstance(value, str) else value


def name_list(value: Any, parameter: str, allowed: Sequence[str]) -> list[str]:
    """The names of a grid parameter: a list, or one string of names separated by spaces, the form a list
    takes on the command line (`--params 'distill.objectives=fkl rkl'`: Kedro splits --params on commas)."""
    names = list(spaced_names(value))
    if not names or not all(isinstance(n, str) for n in names):
        raise UserInputError(
            f"{parameter} must be a non-empty list of names (on the command line: names separated by "
            f"spaces, e.g. --params '{parameter}=fkl rkl'), got {value!r}"
        )
    if len(set(names)) != len(names):
        raise UserInputError(f"{parameter} lists a name twice: {names}")
    if unknown := sorted(set(names) - set(allowed)):
        raise UserInputError(f"{parameter}: unknown {unknown}; choose from {list(allowed)}")
    return names
