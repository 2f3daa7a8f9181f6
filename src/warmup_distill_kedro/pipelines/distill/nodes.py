"""Nodes of the `distill` pipeline: one KD run per (student variant, objective) cell of the grid."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch

from warmup_distill_kedro.core.encoding import IGNORE_INDEX, collate, encode_examples
from warmup_distill_kedro.core.kd_data import StudentSampledBatches
from warmup_distill_kedro.core.modeling import Checkpoint, count_parameters
from warmup_distill_kedro.core.objectives import KDConfig, distillation_loss, kd_loss
from warmup_distill_kedro.core.sampling import generate
from warmup_distill_kedro.core.tasks import RESPONSE_SEPARATOR
from warmup_distill_kedro.core.tokenization import eos_and_pad_ids, vocabulary_fingerprint
from warmup_distill_kedro.core.training import ShuffledBatches, TrainingRun
from warmup_distill_kedro.pipelines.distill.params import DistillParams
from warmup_distill_kedro.tracking import log_step_metrics

logger = logging.getLogger(__name__)


def prepare_kd_examples(
    teacher: Checkpoint, train_examples: pd.DataFrame, params: DistillParams
) -> pd.DataFrame:
    """The KD training set every cell shares: the selected training examples; for `sequence_kd`, with
    the teacher's greedy responses in place of the gold ones (the gold kept as `gold_response`)."""
    data = params.data
    examples = train_examples.iloc[data.skip_examples :]
    if data.max_examples is not None:
        examples = examples.head(data.max_examples)
    if examples.empty:
        raise ValueError(
            f"distill: no training examples left after distill.data.skip_examples={data.skip_examples} "
            f"({len(train_examples)} in the training split)"
        )
    examples = examples.reset_index(drop=True).assign(gold_response=lambda t: t["response"])
    if data.mode != "sequence_kd":
        return examples
    greedy = data.sampling.model_copy(update={"do_sample": False})
    generations = generate(
        teacher.model, teacher.tokenizer, examples["prompt"].tolist(), greedy, desc="teacher writes"
    )
    # The generated text starts with the separator the task puts between prompt and response.
    responses = [g.text.removeprefix(RESPONSE_SEPARATOR) for g in generations]
    logger.info(
        "sequence_kd: the teacher wrote %d responses (%.1f%% finished)",
        len(responses), 100 * sum(g.finished for g in generations) / len(generations),
    )  # fmt: skip
    return examples.assign(response=responses)


def distill_student(
    teacher: Checkpoint,
    student: Checkpoint,
    kd_examples: pd.DataFrame,
    validation_examples: pd.DataFrame,
    params: DistillParams,
    variant: str,
    objective: str,
) -> tuple[Checkpoint, dict[str, Any]]:
    """Distill `teacher` into a copy of `student` with one objective; the teacher stays frozen."""
    vocab_size = shared_vocabulary_size(teacher, student, objective)
    kd = KDConfig(
        objective=objective,
        temperature=params.temperature,
        kd_rate=params.kd_rate,
        options=params.options.get(objective, {}),
        chunk_size=params.chunk_size,
    )
    tokenizer = student.tokenizer
    _, pad_id = eos_and_pad_ids(tokenizer)
    encoded, report = encode_examples(tokenizer, kd_examples, params.max_length)
    validation, _ = encode_examples(
        tokenizer, validation_examples.head(params.validation_examples), params.max_length
    )
    teacher_model = teacher.model.eval().requires_grad_(False)
    model = copy.deepcopy(student.model)

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        with torch.no_grad():
            teacher_logits = _logits(teacher_model.to(batch["input_ids"].device), batch)
        return distillation_loss(_logits(model, batch), teacher_logits, batch["labels"], kd, vocab_size)

    source = _data_source(encoded, model, tokenizer, params, pad_id)

    def heldout(model: torch.nn.Module) -> dict[str, float]:
        statistics = heldout_statistics(
            model, teacher_model, validation, pad_id, params.training.batch_size, vocab_size
        )
        if isinstance(source, StudentSampledBatches):  # adaptive: a stalled validation loss raises the share
            source.observe_validation(statistics["validation_nll"])
            statistics["student_sampled_share"] = source.share
        return statistics

    logger.info(
        "distill %s/%s: %d sequences (%d cut), %s, T %.1f, kd_rate %.2f",
        variant, objective, report.n_examples, report.n_truncated, objective, kd.temperature, kd.kd_rate,
    )  # fmt: skip
    run = TrainingRun(
        model,
        loss_fn,
        source,
        params.training,
        eval_fn=heldout,
        metrics_sink=log_step_metrics,
        name=f"distill {variant}/{objective}",
    )
    initial = heldout(model)
    log_step_metrics({f"eval/{k}": v for k, v in initial.items()}, 0)
    result = run.run()
    metrics: dict[str, Any] = {
        "variant": variant,
        "objective": objective,
        "steps": result.steps,
        "train_sequences": report.n_examples,
        "data_mode": params.data.mode,
        **(_source_counts(source)),
        **{f"initial_{k}": v for k, v in initial.items()},
        **{k.replace("eval/", "final_"): v for k, v in result.final_eval.items()},
    }
    metadata = {
        **{k: v for k, v in student.metadata.items() if k not in ("stage", "steps", "params")},
        "role": "student",
        "stage": "distill",
        "variant": variant,
        "objective": objective,
        "parameters": count_parameters(result.model),
        "steps": result.steps,
        "kd": kd.model_dump(mode="json"),
    }
    return Checkpoint(model=result.model, tokenizer=tokenizer, metadata=metadata), metrics


def _data_source(encoded, model, tokenizer, params: DistillParams, pad_id: int):
    """Gold batches (off_policy, sequence_kd) or gold batches partly replaced by student samples."""
    training = params.training
    if params.data.mode in ("on_policy", "adaptive"):
        return StudentSampledBatches(
            encoded, model, tokenizer, params.data, training.batch_size, training.seed, params.max_length
        )
    return ShuffledBatches(encoded, training.batch_size, lambda b: collate(b, pad_id), training.seed)


def _source_counts(source: Any) -> dict[str, int]:
    if isinstance(source, StudentSampledBatches):
        return {f"batches_{kind}": count for kind, count in source.counts.items()}
    return {}


def shared_vocabulary_size(teacher: Checkpoint, student: Checkpoint, objective: str) -> int:
    """The number of logit columns both models mean the same thing by (padding rows are dropped)."""
    if vocabulary_fingerprint(teacher.tokenizer) != vocabulary_fingerprint(student.tokenizer):
        raise ValueError(
            f"distill: objective {objective!r} compares teacher and student distributions token by token, "
            f"but their tokenizers differ (teacher {len(teacher.tokenizer)} tokens, student "
            f"{len(student.tokenizer)}). Give both the same tokenizer, or use an objective for different "
            "tokenizers (dskd_cma)."
        )
    return len(student.tokenizer)


@torch.no_grad()
def heldout_statistics(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    encoded: list,
    pad_id: int,
    batch_size: int,
    vocab_size: int,
) -> dict[str, float]:
    """Gold-response NLL of the student and KL(teacher || student) at temperature 1, token means."""
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    nll, kl, tokens = 0.0, 0.0, 0.0
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in collate(encoded[start : start + batch_size], pad_id).items()}
        student_logits, teacher_logits = _logits(student, batch), _logits(teacher.to(device), batch)
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        n = float(mask.sum())
        nll += n * _ce(student_logits, batch["labels"], vocab_size)
        kl += n * float(
            kd_loss("fkl", student_logits[:, :-1], teacher_logits[:, :-1], mask, vocab_size=vocab_size)
        )
        tokens += n
    student.train(was_training)
    return {"validation_nll": nll / max(tokens, 1.0), "validation_kl": kl / max(tokens, 1.0)}


def _ce(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> float:
    return float(
        torch.nn.functional.cross_entropy(
            logits[:, :-1, :vocab_size].float().flatten(0, 1),
            labels[:, 1:].flatten(),
            ignore_index=IGNORE_INDEX,
        )
    )


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def cell_function(variant: str, objective: str) -> Callable[..., tuple[Checkpoint, dict[str, Any]]]:
    """The node function of one grid cell: `distill_student` with its variant and objective bound."""

    def distill(
        teacher: Checkpoint,
        student: Checkpoint,
        kd_examples: pd.DataFrame,
        validation_examples: pd.DataFrame,
        params: DistillParams,
    ) -> tuple[Checkpoint, dict[str, Any]]:
        return distill_student(teacher, student, kd_examples, validation_examples, params, variant, objective)

    distill.__name__ = distill.__qualname__ = f"distill_{variant}_{objective}"
    return distill
