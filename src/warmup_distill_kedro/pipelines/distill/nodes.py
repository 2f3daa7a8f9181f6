"""Nodes of the `distill` pipeline: one KD run per (student variant, objective) cell of the grid."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from warmup_distill_kedro.core.evaluation.likelihood import heldout_distribution
from warmup_distill_kedro.core.generation.sampling import generate
from warmup_distill_kedro.core.kd.data import StudentSampledBatches
from warmup_distill_kedro.core.kd.dual_space import (
    DSKDConfig,
    StudentWithProjectors,
    collate_dual,
    dskd_cma_loss,
    dskd_loss,
    encode_dual,
    projector_pretraining_loss,
)
from warmup_distill_kedro.core.kd.fused import fused_model_distillation_loss
from warmup_distill_kedro.core.kd.losses import KDConfig, distillation_loss
from warmup_distill_kedro.core.models.encoding import causal_lm_loss, collate, encode_examples
from warmup_distill_kedro.core.models.modeling import Checkpoint, count_parameters
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids, vocabulary_fingerprint
from warmup_distill_kedro.core.tasks import RESPONSE_SEPARATOR
from warmup_distill_kedro.core.training.batches import ShuffledBatches
from warmup_distill_kedro.core.training.loop import TrainingRun
from warmup_distill_kedro.pipelines.distill.params import (
    BASELINE_OBJECTIVES,
    DUAL_SPACE_OBJECTIVES,
    DistillParams,
)
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


def prepare_sft_examples(train_examples: pd.DataFrame, params: DistillParams) -> pd.DataFrame:
    """The gold examples of the plain-SFT baseline (objective `sft`): the student's labelled data, which
    may be far fewer than the prompts KD gets the teacher's supervision on."""
    examples = train_examples if params.sft_examples is None else train_examples.head(params.sft_examples)
    if examples.empty:
        raise ValueError("distill: no training examples for the sft baseline (the training split is empty)")
    return examples.reset_index(drop=True)


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
    tokenizer = student.tokenizer
    _, pad_id = eos_and_pad_ids(tokenizer)
    encoded, report = encode_examples(tokenizer, kd_examples, params.max_length, params.prompt_overflow)
    validation, _ = encode_examples(
        tokenizer,
        validation_examples.head(params.validation_examples),
        params.max_length,
        params.prompt_overflow,
    )
    teacher_model = teacher.model.eval().requires_grad_(False)
    if objective in DUAL_SPACE_OBJECTIVES:
        cell = _dual_space_cell(teacher, student, kd_examples, encoded, params, objective)
    elif objective in BASELINE_OBJECTIVES:  # `kd_examples` holds the sft examples here (see pipeline.py)
        cell = _sft_cell(teacher, student, encoded, params)
    else:
        cell = _token_level_cell(teacher, student, encoded, params, objective)
    source = cell.source

    def heldout(model: torch.nn.Module) -> dict[str, float]:
        statistics = heldout_statistics(
            cell.student, teacher_model, validation, pad_id, params.training.batch_size, cell.shared_vocab
        )
        if isinstance(source, StudentSampledBatches):  # adaptive: a stalled validation loss raises the share
            source.observe_validation(statistics["validation_nll"])
            statistics["student_sampled_share"] = source.share
        return statistics

    logger.info(
        "distill %s/%s: %d sequences (%d cut), T %.1f, kd_rate %.2f",
        variant, objective, report.n_examples, report.n_truncated, params.temperature, params.kd_rate,
    )  # fmt: skip
    if cell.pretrain is not None:
        cell.pretrain()
    run = TrainingRun(
        cell.model,
        cell.loss_fn,
        source,
        params.training,
        parameter_groups=cell.parameter_groups,
        eval_fn=heldout,
        metrics_sink=log_step_metrics,
        name=f"distill {variant}/{objective}",
    )
    initial = heldout(cell.model)
    log_step_metrics({f"eval/{k}": v for k, v in initial.items()}, 0)
    result = run.run()
    metrics: dict[str, Any] = {
        "variant": variant,
        "objective": objective,
        "steps": result.steps,
        "train_sequences": report.n_examples,
        "truncated_prompts": report.n_prompts_truncated,
        "data_mode": params.data.mode,
        **(_source_counts(source)),
        **{f"initial_{k}": v for k, v in initial.items()},
        **{k.replace("eval/", "final_"): v for k, v in result.final_eval.items()},
        "history": [{"step": 0.0, **{f"eval/{k}": v for k, v in initial.items()}}, *result.history],
    }
    metadata = {
        **{k: v for k, v in student.metadata.items() if k not in ("stage", "steps", "params")},
        "role": "student",
        "stage": "distill",
        "variant": variant,
        "objective": objective,
        "parameters": count_parameters(cell.student),
        "steps": result.steps,
        "kd": cell.config.model_dump(mode="json") if cell.config is not None else None,
    }
    return Checkpoint(model=cell.student, tokenizer=tokenizer, metadata=metadata), metrics


@dataclass
class _Cell:
    """What one grid cell trains, how, and on what."""

    model: torch.nn.Module  # what the loop trains (the student, or the student with its projectors)
    student: torch.nn.Module  # the causal LM inside it: evaluated and saved
    loss_fn: Callable[..., Any]
    source: Any
    config: KDConfig | DSKDConfig | None  # None: plain SFT, no teacher in the loss
    shared_vocab: int | None  # tokens both models share (None: different tokenizers, no token-level KL)
    parameter_groups: list[dict[str, Any]] | None = None
    pretrain: Callable[[], None] | None = None


def _token_level_cell(
    teacher: Checkpoint, student: Checkpoint, encoded: list, params: DistillParams, objective: str
) -> _Cell:
    """fkl, rkl, js, ...: the two models' distributions compared token by token."""
    vocab_size = shared_vocabulary_size(teacher, student, objective)
    kd = KDConfig(
        objective=objective,
        temperature=params.temperature,
        kd_rate=params.kd_rate,
        options=params.options.get(objective, {}),
        chunk_size=params.chunk_size,
    )
    model = copy.deepcopy(student.model)
    teacher_model = teacher.model

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        teacher_on_device = teacher_model.to(batch["input_ids"].device)
        if params.fused_head:  # from the last hidden states and the heads, chunk by chunk
            return fused_model_distillation_loss(model, teacher_on_device, batch, kd, vocab_size)
        with torch.no_grad():
            teacher_logits = _logits(teacher_on_device, batch)
        return distillation_loss(_logits(model, batch), teacher_logits, batch["labels"], kd, vocab_size)

    source = _data_source(encoded, model, student.tokenizer, params)
    return _Cell(model, model, loss_fn, source, kd, vocab_size)


def _sft_cell(teacher: Checkpoint, student: Checkpoint, encoded: list, params: DistillParams) -> _Cell:
    """Plain SFT on gold examples (the teacher is not asked): what KD must beat at equal steps."""
    shared = vocabulary_fingerprint(teacher.tokenizer) == vocabulary_fingerprint(student.tokenizer)
    model = copy.deepcopy(student.model)
    source = _gold_batches(encoded, student.tokenizer, params)
    return _Cell(model, model, causal_lm_loss, source, None, len(student.tokenizer) if shared else None)


def _dual_space_cell(
    teacher: Checkpoint,
    student: Checkpoint,
    kd_examples: pd.DataFrame,
    encoded: list,
    params: DistillParams,
    objective: str,
) -> _Cell:
    """dskd (one tokenizer) and dskd_cma (two): projectors carry each model's hidden states into the
    other's output space (core.dskd); the projectors learn at their own rate and may be pre-trained."""
    options = dict(params.options.get(objective, {}))
    pretrain_steps = int(options.pop("pretrain_steps", 0))
    config = DSKDConfig(
        divergence=options.pop("divergence", "fkl"),
        projector_lr=options.pop("projector_lr", 1e-3),
        options=options,
        temperature=params.temperature,
        kd_rate=params.kd_rate,
        chunk_size=params.chunk_size,
    )
    cross = objective == "dskd_cma"
    wrapper = StudentWithProjectors(
        copy.deepcopy(student.model), teacher.model.config.hidden_size, cross_attention=cross
    )
    teacher_model = teacher.model
    training = params.training
    if cross:
        if params.data.mode in ("on_policy", "adaptive"):
            raise ValueError(
                f"distill: {objective} trains on fixed text; use data.mode off_policy or sequence_kd"
            )
        student_examples, teacher_examples = encode_dual(
            student.tokenizer,
            teacher.tokenizer,
            kd_examples["prompt"].tolist(),
            [RESPONSE_SEPARATOR + r for r in kd_examples["response"]],
            params.max_length,
        )
        pads = eos_and_pad_ids(student.tokenizer)[1], eos_and_pad_ids(teacher.tokenizer)[1]
        source = ShuffledBatches(
            list(zip(student_examples, teacher_examples, strict=True)),
            training.batch_size,
            lambda pairs: collate_dual([s for s, _ in pairs], [t for _, t in pairs], *pads),
            training.seed,
        )
        sizes = len(student.tokenizer), len(teacher.tokenizer)
        shared_vocab = None

        def loss_fn(model, batch):
            return dskd_cma_loss(model, teacher_model.to(batch["input_ids"].device), batch, config, *sizes)
    else:
        shared_vocab = shared_vocabulary_size(teacher, student, objective)
        source = _data_source(encoded, wrapper.student, student.tokenizer, params)

        def loss_fn(model, batch):
            return dskd_loss(model, teacher_model.to(batch["input_ids"].device), batch, config, shared_vocab)

    def pretrain() -> None:
        """Projectors alone (the CE of the projected teacher): a DSKD-specific warmup of the projectors."""
        TrainingRun(
            wrapper,
            lambda model, batch: projector_pretraining_loss(
                model, teacher_model.to(batch["input_ids"].device), batch, len(student.tokenizer)
            ),
            source,
            training.model_copy(update={"max_steps": pretrain_steps, "eval_every": 0}),
            parameter_groups=[{"params": wrapper.projector_parameters(), "lr": config.projector_lr}],
            metrics_sink=lambda metrics, step: log_step_metrics(
                {f"projector_pretraining/{k}": v for k, v in metrics.items()}, step
            ),
            name=f"{objective} projectors",
        ).run()

    return _Cell(
        model=wrapper,
        student=wrapper.student,
        loss_fn=loss_fn,
        source=source,
        config=config,
        shared_vocab=shared_vocab,
        parameter_groups=wrapper.parameter_groups(training.learning_rate, config.projector_lr),
        pretrain=pretrain if pretrain_steps > 0 else None,
    )


def _data_source(encoded, model, tokenizer, params: DistillParams):
    """Gold batches (off_policy, sequence_kd) or gold batches partly replaced by student samples."""
    training = params.training
    if params.data.mode in ("on_policy", "adaptive"):
        return StudentSampledBatches(
            encoded, model, tokenizer, params.data, training.batch_size, training.seed, params.max_length
        )
    return _gold_batches(encoded, tokenizer, params)


def _gold_batches(encoded, tokenizer, params: DistillParams) -> ShuffledBatches:
    """The examples as they are, shuffled per epoch by the training seed (every cell sees the same order)."""
    _, pad_id = eos_and_pad_ids(tokenizer)
    training = params.training
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


def heldout_statistics(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    encoded: list,
    pad_id: int,
    batch_size: int,
    vocab_size: int | None,
) -> dict[str, float]:
    """Gold-response NLL of the student and, with a shared vocabulary, KL(teacher || student)."""
    statistics = heldout_distribution(student, teacher, encoded, pad_id, batch_size, vocab_size)
    renamed = {"heldout_nll": "validation_nll", "heldout_kl": "validation_kl"}
    return {renamed[k]: v for k, v in statistics.items() if k in renamed}


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


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
