"""One located source and one converted checkpoint per slot (`<slot>_source`, `<slot>_checkpoint`), and a
student cut from the SmolLM2 teacher (`smollm2_cut_checkpoint`)."""

from kedro.pipeline import Pipeline, node

from warmup_distill_kedro.pipelines.checkpoints.nodes import (
    convert_checkpoint,
    cut_student,
    locate_checkpoint,
)
from warmup_distill_kedro.pipelines.checkpoints.params import CheckpointSource

# The real checkpoints the catalog holds, each named after the packaged model it is by default
# (`checkpoints.<slot>.source` may point it at a local file or folder instead).
SLOTS = ("smollm2", "gemma3")
# The student is cut from the teacher of the same-tokenizer flow (its layers, vocabulary and tokenizer).
CUT_FROM = "smollm2"
CUT = f"{CUT_FROM}_cut"


def _locate(slot: str):
    """`locate_checkpoint` for one slot, with the signature Kedro validates the parameters by."""

    def locate(params: CheckpointSource, raw_folder: str) -> dict[str, str]:
        return locate_checkpoint(slot, params, raw_folder)

    locate.__name__ = locate.__qualname__ = f"locate_{slot}"
    return locate


def create_pipeline(**kwargs) -> Pipeline:
    nodes = []
    for slot in SLOTS:
        nodes += [
            node(
                _locate(slot),
                [f"params:checkpoints.{slot}", "params:checkpoints.raw_folder"],
                f"{slot}_source",
                name=f"locate_{slot}",
                tags=[f"checkpoint.{slot}"],
            ),
            node(
                convert_checkpoint,
                [f"{slot}_source", f"{slot}_previous_conversion"],
                f"{slot}_checkpoint",
                name=f"convert_{slot}",
                tags=[f"checkpoint.{slot}"],
            ),
        ]
    nodes.append(
        node(
            cut_student,
            [f"{CUT_FROM}_checkpoint", "params:checkpoints.student", f"{CUT}_previous_conversion"],
            f"{CUT}_checkpoint",
            name=f"cut_{CUT_FROM}",
            tags=[f"checkpoint.{CUT}"],
        )
    )
    return Pipeline(nodes, tags=["checkpoints"])
