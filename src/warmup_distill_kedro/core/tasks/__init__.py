"""The tasks (pure Python and pandas): procedural math and instruction data, users' files, the common
table schema, train/validation/test splits and answer checking."""

from warmup_distill_kedro.core.tasks.answers import (
    canonical_number,
    canonicalize_number,
    extract_final_answer,
    extract_last_number,
    math_exact_match,
    math_flexible_match,
)
from warmup_distill_kedro.core.tasks.files import read_task_file
from warmup_distill_kedro.core.tasks.instruction_task import (
    SENTENCE_PREFIXES,
    TEMPLATE_NAMES,
    InstructionTaskConfig,
    check_instruction_answer,
    generate_instructions,
)
from warmup_distill_kedro.core.tasks.math_task import MathTaskConfig, generate_math
from warmup_distill_kedro.core.tasks.schema import (
    COLUMNS,
    RESPONSE_SEPARATOR,
    TASKS,
    TaskDataError,
    build_prompt,
    training_texts,
    validate_table,
)
from warmup_distill_kedro.core.tasks.splits import SPLITS, SplitConfig, split_examples

__all__ = [
    "COLUMNS",
    "RESPONSE_SEPARATOR",
    "SENTENCE_PREFIXES",
    "SPLITS",
    "TASKS",
    "TEMPLATE_NAMES",
    "InstructionTaskConfig",
    "MathTaskConfig",
    "SplitConfig",
    "TaskDataError",
    "build_prompt",
    "canonical_number",
    "canonicalize_number",
    "check_instruction_answer",
    "extract_final_answer",
    "extract_last_number",
    "generate_instructions",
    "generate_math",
    "math_exact_match",
    "math_flexible_match",
    "read_task_file",
    "split_examples",
    "training_texts",
    "validate_table",
]
