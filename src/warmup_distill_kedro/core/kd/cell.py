"""One cell of the distill grid: a teacher, a starting student and one objective, trained into a student.

`distill_cell` is the entry point. Every cell of a grid gets the same data, budget and seed
(`DistillConfig`), so that the cells compare; what differs is what the objective makes of them:

- token-level objectives (fkl, rkl, js, tvd, skl, srkl, akl, dpkd; `divergences.OBJECTIVES`): the two
  models' next-token distributions compared position by position, `(1 - kd_rate) CE + kd_rate KD`
  (`losses.distillation_loss`, or `fused.fused_model_distillation_loss` with `fused_head`);
- sinkd: a token-level divergence plus the Sinkhorn distance between the batch's positions (`sinkd.py`);
- minillm: the sequence-level reverse KL by policy gradient on rounds of the student's own rollouts, sampled
  with the teacher mixed in (`minillm.py`);
- dual-space objectives (dskd with one tokenizer, dskd_cma with two; `dual_space.py`): projectors carry
  each model's hidden states into the other's output space, learning at their own rate, optionally
  pre-trained alone first;
- the baseline `sft`: plain SFT on gold examples, the teacher not asked: what KD must beat at equal steps.

The student is validated along the way on gold validation responses: its NLL and, when both models share
a vocabulary, KL(teacher || student) (the KD curves of the report).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from pydantic import Field, model_validator

from warmup_distill_kedro.core.errors import UserInputError
from warmup_distill_kedro.core.evaluation.likelihood import heldout_distribution
from warmup_distill_kedro.core.kd.cache import (
    TeacherCacheConfig,
    TeacherTopK,
    cached_examples,
    check_cache,
    collate_cached,
    teacher_identity,
    topk_distillation_loss,
)
from warmup_distill_kedro.core.kd.config import KDSettings
from warmup_distill_kedro.core.kd.data import (
    STUDENT_SAMPLED,
    KDDataConfig,
    StudentSampledBatches,
    gold_batches,
    kd_batches,
)
from warmup_distill_kedro.core.kd.divergences import OBJECTIVES, validate_options
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
from warmup_distill_kedro.core.kd.minillm import LM_PREFIX, MiniLLMConfig, MiniLLMRollouts, minillm_loss
from warmup_distill_kedro.core.kd.sinkd import SinKDConfig, sinkd_loss
from warmup_distill_kedro.core.models.chat import PromptFormat, require_chat_template, response_text
from warmup_distill_kedro.core.models.encoding import (
    EncodedExample,
    PromptOverflowParameter,
    causal_lm_loss,
    encode_examples,
)
from warmup_distill_kedro.core.models.modeling import Checkpoint, disable_dropout
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids, vocabulary_fingerprint
from warmup_distill_kedro.core.tasks import RESPONSE_SEPARATOR
from warmup_distill_kedro.core.training.batches import ShuffledBatches
from warmup_distill_kedro.core.training.config import TrainingConfig
from warmup_distill_kedro.core.training.context import current_metrics_sink
from warmup_distill_kedro.core.training.loop import TrainingRun
from warmup_distill_kedro.core.training.stage import train_stage

logger = logging.getLogger(__name__)

# Dual-space KD (arXiv 2406.17328): one tokenizer (dskd) or two, aligned by cross-model attention (dskd_cma).
DUAL_SPACE_OBJECTIVES: tuple[str, ...] = ("dskd", "dskd_cma")
# A token-level divergence plus a batch-level term on the same logits: SinKD's Sinkhorn distance.
BATCH_LEVEL_OBJECTIVES: tuple[str, ...] = ("sinkd",)
# The sequence-level reverse KL by policy gradient on the student's own rollouts: MiniLLM.
SEQUENCE_LEVEL_OBJECTIVES: tuple[str, ...] = ("minillm",)
# Plain SFT on the same data, steps and seed, without the teacher: the control KD has to beat.
BASELINE_OBJECTIVES: tuple[str, ...] = ("sft",)
CELL_OBJECTIVES: tuple[str, ...] = (
    *OBJECTIVES,
    *BATCH_LEVEL_OBJECTIVES,
    *SEQUENCE_LEVEL_OBJECTIVES,
    *DUAL_SPACE_OBJECTIVES,
    *BASELINE_OBJECTIVES,
)


def reads_teacher_cache(enabled: bool, data_mode: str, objective: str) -> bool:
    """Whether a cell reads the teacher from its top-k cache: when it is enabled, for token-level objectives
    on fixed text. The cache holds the teacher's distributions of the KD examples' tokens: DSKD needs its
    hidden states, sinkd its whole distributions, dpkd its probability of the student's top token (outside its
    top k as often as not), and the sampled data modes (on_policy, adaptive) new text every step, so those
    cells keep the live teacher."""
    readable = objective in OBJECTIVES and objective != "dpkd"
    return enabled and readable and data_mode in ("sequence_kd", "off_policy")


class DistillConfig(KDSettings):
    """What every cell of a grid shares: the KD settings, each objective's options, the data, the budget."""

    fused_head: bool = Field(
        False,
        description="compute the KD loss from the last hidden states and the LM heads chunk by chunk, never "
        "materializing either model's full logits (core/kd/fused.py); needs chunk_size. Applies to the "
        f"token-level objectives ({', '.join(OBJECTIVES)}); the other cells ignore it. "
        "Not with FSDP (sharded heads)",
    )
    options: dict[str, dict[str, Any]] = Field(
        {},
        description="per-objective options, e.g. {js: {beta: 0.5}, dskd: {divergence: fkl, projector_lr: 0.001}}",
    )
    data: KDDataConfig = KDDataConfig()
    teacher_cache: TeacherCacheConfig = TeacherCacheConfig()
    sft_examples: int | None = Field(
        1000,
        gt=0,
        description="objective sft: plain SFT on the first N gold training examples (the student's labelled "
        "data); null: every training example",
    )
    training: TrainingConfig
    max_length: int = Field(192, gt=8)
    prompt_overflow: PromptOverflowParameter = "error"
    validation_examples: int = Field(256, gt=0)

    @model_validator(mode="after")
    def _options_are_valid(self) -> DistillConfig:
        """An unknown objective or option stops the run here, before any training."""
        if self.fused_head and self.chunk_size is None:
            raise ValueError("fused_head: true needs chunk_size (positions per chunk, e.g. 128); it is null")
        if self.fused_head and self.teacher_cache.enabled:
            raise ValueError(
                "fused_head and teacher_cache.enabled are both true: the cache replaces the teacher's forward, "
                "the fused head its logits; choose one"
            )
        for objective in self.options:
            try:
                self.loss_config(objective)
            except ValueError as error:  # pydantic's ValidationError is a ValueError
                raise ValueError(f"options.{objective}: {error}") from error
        return self

    def reads_teacher_cache(self, objective: str) -> bool:
        return reads_teacher_cache(self.teacher_cache.enabled, self.data.mode, objective)

    def loss_config(self, objective: str) -> KDConfig | SinKDConfig | MiniLLMConfig | DSKDConfig | None:
        """The loss settings of one objective's cells (None for the sft baseline, which has none)."""
        options = self.options.get(objective, {})
        settings = KDSettings(temperature=self.temperature, kd_rate=self.kd_rate, chunk_size=self.chunk_size)
        if objective in DUAL_SPACE_OBJECTIVES:
            return DSKDConfig.from_options(settings, options)
        if objective in BATCH_LEVEL_OBJECTIVES:
            return SinKDConfig.from_options(settings, options)
        if objective in SEQUENCE_LEVEL_OBJECTIVES:
            return MiniLLMConfig.from_options(settings, options)
        if objective in BASELINE_OBJECTIVES:
            if options:
                raise ValueError(f"plain SFT takes no options, got {sorted(options)}")
            return None
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose from {list(CELL_OBJECTIVES)}")
        return KDConfig(
            **settings.model_dump(), objective=objective, options=validate_options(objective, **options)
        )


def distill_cell(
    teacher: Checkpoint,
    student: Checkpoint,
    examples: pd.DataFrame,
    validation_examples: pd.DataFrame,
    config: DistillConfig,
    variant: str,
    objective: str,
    teacher_topk: TeacherTopK | None = None,
) -> tuple[Checkpoint, dict[str, Any]]:
    """Distill `teacher` into a copy of `student` with one objective; the teacher stays frozen.

    `examples`: the KD set (prepare_kd_examples), or the gold examples for the sft baseline. `teacher_topk`:
    the teacher's cached top-k of those examples, read instead of running the teacher (token-level cells,
    `config.reads_teacher_cache`). Returns the distilled student and the cell's metrics (its history holds
    the KD curves, step 0 first).
    """
    tokenizer = student.tokenizer
    _, pad_id = eos_and_pad_ids(tokenizer)
    prompt_format = _prompt_format(examples, config, student, teacher)
    encoded, report = encode_examples(
        tokenizer, examples, config.max_length, config.prompt_overflow, prompt_format
    )
    validation, _ = encode_examples(
        tokenizer,
        validation_examples.head(config.validation_examples),
        config.max_length,
        config.prompt_overflow,
        prompt_format,
    )
    teacher.model.eval().requires_grad_(False)
    if objective in DUAL_SPACE_OBJECTIVES:
        cell = _dual_space_cell(teacher, student, examples, encoded, config, objective)
    elif objective in BASELINE_OBJECTIVES:
        cell = _sft_cell(teacher, student, encoded, config)
    elif objective in SEQUENCE_LEVEL_OBJECTIVES:
        cell = _minillm_cell(teacher, student, encoded, config, objective)
    else:
        cell = _token_level_cell(teacher, student, encoded, config, objective, teacher_topk)

    def validate(_model: torch.nn.Module) -> dict[str, float]:
        statistics = heldout_distribution(
            cell.student, teacher.model, validation, pad_id, config.training.batch_size, cell.shared_vocab
        )
        renamed = {"heldout_nll": "validation_nll", "heldout_kl": "validation_kl"}
        statistics = {renamed[k]: v for k, v in statistics.items() if k in renamed}
        if isinstance(cell.source, StudentSampledBatches):  # adaptive: a rising validation loss raises it
            cell.source.observe_validation(statistics["validation_nll"])
            statistics["student_sampled_threshold"] = cell.source.threshold
        return statistics

    if config.teacher_cache.enabled and teacher_topk is None and objective not in BASELINE_OBJECTIVES:
        logger.info(
            "distill %s/%s: the live teacher, not its cache: %s",
            variant,
            objective,
            _why_live(objective, config),
        )
    logger.info(
        "distill %s/%s: %d sequences (%d cut), T %.1f, kd_rate %.2f",
        variant, objective, report.n_examples, report.n_truncated, config.temperature, config.kd_rate,
    )  # fmt: skip
    if cell.pretrain is not None:
        cell.pretrain()
    checkpoint, metrics = train_stage(
        cell.model,
        tokenizer,
        cell.loss_fn,
        cell.source,
        config.training,
        stage="distill",
        name=f"distill {variant}/{objective}",
        params=config,
        eval_fn=validate,
        parameter_groups=cell.parameter_groups,
        trained=cell.student,
        start=student,
        metadata={"variant": variant, "objective": objective, "loss": _dump(config.loss_config(objective))},
    )
    counts = cell.source.counts if isinstance(cell.source, StudentSampledBatches) else {}
    return checkpoint, {
        "variant": variant,
        "objective": objective,
        "train_sequences": report.n_examples,
        "truncated_prompts": report.n_prompts_truncated,
        "data_mode": config.data.mode,
        **{f"batches_{kind}": count for kind, count in counts.items()},
        **metrics,
    }


def _why_live(objective: str, config: DistillConfig) -> str:
    if config.data.mode not in ("sequence_kd", "off_policy"):
        return f"data.mode {config.data.mode} trains on new text every step"
    return {
        "dpkd": "dpkd reads the teacher's probability of the student's top token, outside its cached top k",
        "sinkd": "the Sinkhorn term compares the teacher's whole distributions",
    }.get(objective, "DSKD reads the teacher's hidden states")


@dataclass
class _Cell:
    """What one grid cell trains, how, and on what."""

    model: torch.nn.Module  # what the loop trains (the student, or the student with its projectors)
    student: torch.nn.Module  # the causal LM inside it: validated and saved
    loss_fn: Callable[..., Any]
    source: Any
    shared_vocab: int | None  # tokens both models share (None: different tokenizers, no token-level KL)
    parameter_groups: list[dict[str, Any]] | None = None
    pretrain: Callable[[], None] | None = None


def _token_level_cell(
    teacher: Checkpoint,
    student: Checkpoint,
    encoded: list[EncodedExample],
    config: DistillConfig,
    objective: str,
    teacher_topk: TeacherTopK | None = None,
) -> _Cell:
    """fkl, rkl, js, ..., and sinkd: the two models' distributions compared token by token (the teacher's read
    from its top-k cache when one is given), sinkd's also batch-wise."""
    vocab_size = shared_vocabulary_size(teacher, student, objective)
    kd = config.loss_config(objective)
    assert isinstance(kd, KDConfig | SinKDConfig)
    model = copy.deepcopy(student.model)
    if teacher_topk is not None:
        assert isinstance(kd, KDConfig)  # sinkd needs the teacher's whole distributions: never cached
        check_cache(
            teacher_topk, teacher_identity(teacher), encoded, config.temperature, config.teacher_cache.top_k
        )
        _, pad_id = eos_and_pad_ids(student.tokenizer)
        training = config.training
        source = ShuffledBatches(  # the same order as gold_batches: the same seed, the same examples
            cached_examples(encoded, teacher_topk),
            training.batch_size,
            lambda examples: collate_cached(examples, pad_id),
            training.seed,
        )

        def cached_loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
            return topk_distillation_loss(_logits(model, batch), batch, kd, vocab_size)

        return _Cell(model, model, cached_loss_fn, source, vocab_size)
    teacher_model = teacher.model

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        teacher_on_device = teacher_model.to(batch["input_ids"].device)
        ce = STUDENT_SAMPLED not in batch  # no CE on the student's own samples
        if config.fused_head and isinstance(kd, KDConfig):  # from the last hidden states and the heads
            return fused_model_distillation_loss(model, teacher_on_device, batch, kd, vocab_size, ce)
        with torch.no_grad():
            teacher_logits = _logits(teacher_on_device, batch)
        loss = sinkd_loss if isinstance(kd, SinKDConfig) else distillation_loss
        return loss(_logits(model, batch), teacher_logits, batch["labels"], kd, vocab_size, ce)

    source = kd_batches(encoded, model, student.tokenizer, config.data, config.training, config.max_length)
    return _Cell(model, model, loss_fn, source, vocab_size)


def _minillm_cell(
    teacher: Checkpoint,
    student: Checkpoint,
    encoded: list[EncodedExample],
    config: DistillConfig,
    objective: str,
) -> _Cell:
    """MiniLLM: rounds of rollouts of the KD examples' prompts, sampled by the student with the teacher mixed
    in, trained on by PPO (core/kd/minillm.py); the language-modelling term reads the KD examples."""
    vocab_size = shared_vocabulary_size(teacher, student, objective)
    minillm = config.loss_config(objective)
    assert isinstance(minillm, MiniLLMConfig)
    # The ratio of new to old log-probabilities must be 1 where nothing changed: no dropout noise in it.
    model = disable_dropout(copy.deepcopy(student.model))
    training = config.training
    lm = gold_batches(encoded, student.tokenizer, training) if minillm.lm_coef > 0 else None
    source = MiniLLMRollouts(
        encoded, model, teacher.model, student.tokenizer, minillm, config.data.sampling,
        training.batch_size, training.seed, config.max_length, lm,
    )  # fmt: skip
    lm_loss_config = KDConfig(**minillm.shared_settings())
    teacher_model = teacher.model

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        teacher_on_device = teacher_model.to(batch["input_ids"].device)
        teacher_logits = None
        if minillm.single_step:
            with torch.no_grad():
                teacher_logits = _logits(teacher_on_device, batch)
        loss, metrics = minillm_loss(_logits(model, batch), teacher_logits, batch, minillm, vocab_size)
        if lm is not None:
            gold = {k.removeprefix(LM_PREFIX): v for k, v in batch.items() if k.startswith(LM_PREFIX)}
            with torch.no_grad():
                teacher_gold = _logits(teacher_on_device, gold)
            lm_loss, lm_metrics = distillation_loss(
                _logits(model, gold), teacher_gold, gold["labels"], lm_loss_config, vocab_size
            )
            loss = loss + minillm.lm_coef * lm_loss
            metrics |= {"lm": lm_loss.item(), "ce": lm_metrics["ce"], "kd": lm_metrics["kd"]}
        return loss, {**metrics, "loss": loss.item()}

    return _Cell(model, model, loss_fn, source, vocab_size)


def _sft_cell(
    teacher: Checkpoint, student: Checkpoint, encoded: list[EncodedExample], config: DistillConfig
) -> _Cell:
    """Plain SFT on gold examples (the teacher is not asked): what KD must beat at equal steps."""
    shared = vocabulary_fingerprint(teacher.tokenizer) == vocabulary_fingerprint(student.tokenizer)
    model = copy.deepcopy(student.model)
    source = gold_batches(encoded, student.tokenizer, config.training)
    return _Cell(model, model, causal_lm_loss, source, len(student.tokenizer) if shared else None)


def _prompt_format(
    examples: pd.DataFrame, config: DistillConfig, student: Checkpoint, teacher: Checkpoint
) -> PromptFormat:
    """The prompt format every cell encodes with (`distill.data.sampling.prompt_format`), checked against
    the one the KD examples were prepared in and against both tokenizers, before any training."""
    prompt_format = config.data.sampling.prompt_format
    prepared = set(examples["prompt_format"]) if "prompt_format" in examples else {prompt_format}
    if prepared != {prompt_format}:
        raise UserInputError(
            f"distill.data.sampling.prompt_format is {prompt_format} but the KD examples were prepared in "
            f"{sorted(prepared)}: prepare them again (kedro run --pipeline=distill runs it first)"
        )
    if prompt_format == "chat":
        for checkpoint in (student, teacher):
            require_chat_template(checkpoint.tokenizer, "distill.data.sampling.prompt_format")
    return prompt_format


def _dual_space_cell(
    teacher: Checkpoint,
    student: Checkpoint,
    examples: pd.DataFrame,
    encoded: list[EncodedExample],
    config: DistillConfig,
    objective: str,
) -> _Cell:
    """dskd (one tokenizer) and dskd_cma (two): projectors carry each model's hidden states into the
    other's output space (core/kd/dual_space.py); the projectors learn at their own rate and may be
    pre-trained."""
    dskd = config.loss_config(objective)
    assert isinstance(dskd, DSKDConfig)
    prompt_format = config.data.sampling.prompt_format
    cross = objective == "dskd_cma"
    wrapper = StudentWithProjectors(
        copy.deepcopy(student.model),
        teacher.model.config.hidden_size,
        cross_attention=cross,
        seed=config.training.seed,
    )
    teacher_model = teacher.model
    training = config.training
    if cross:
        if config.data.mode in ("on_policy", "adaptive"):
            raise ValueError(
                f"distill: {objective} trains on fixed text; use data.mode off_policy or sequence_kd"
            )
        student_examples, teacher_examples = encode_dual(
            student.tokenizer,
            teacher.tokenizer,
            examples["prompt"].tolist(),
            [response_text(r, RESPONSE_SEPARATOR, prompt_format) for r in examples["response"]],
            config.max_length,
            examples["finished"].astype(bool).tolist() if "finished" in examples else True,
            prompt_format,
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
            return dskd_cma_loss(model, teacher_model.to(batch["input_ids"].device), batch, dskd, *sizes)
    else:
        shared_vocab = shared_vocabulary_size(teacher, student, objective)
        source = kd_batches(
            encoded, wrapper.student, student.tokenizer, config.data, training, config.max_length
        )

        def loss_fn(model, batch):
            teacher_on_device = teacher_model.to(batch["input_ids"].device)
            return dskd_loss(
                model, teacher_on_device, batch, dskd, shared_vocab, ce=STUDENT_SAMPLED not in batch
            )

    def pretrain() -> None:
        """Projectors alone (the CE of the projected teacher): a DSKD-specific warmup of the projectors."""
        sink = current_metrics_sink()

        def prefixed(metrics: Mapping[str, float], step: int) -> None:  # beside the cell's own curves
            if sink is not None:
                sink({f"projector_pretraining/{k}": v for k, v in metrics.items()}, step)

        TrainingRun(
            wrapper,
            lambda model, batch: projector_pretraining_loss(
                model,
                teacher_model.to(batch["input_ids"].device),
                batch,
                len(student.tokenizer),
                dskd.cma_std,
            ),
            source,
            training.model_copy(update={"max_steps": dskd.pretrain_steps, "eval_every": 0}),
            parameter_groups=[{"params": wrapper.projector_parameters(), "lr": dskd.projector_lr}],
            metrics_sink=prefixed,
            name=f"{objective} projectors",
        ).run()

    return _Cell(
        model=wrapper,
        student=wrapper.student,
        loss_fn=loss_fn,
        source=source,
        shared_vocab=shared_vocab,
        parameter_groups=wrapper.parameter_groups(training.learning_rate, dskd.projector_lr),
        pretrain=pretrain if dskd.pretrain_steps > 0 else None,
    )


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


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _dump(loss: KDConfig | SinKDConfig | MiniLLMConfig | DSKDConfig | None) -> dict[str, Any] | None:
    """The cell's loss settings with every default resolved (None for the sft baseline)."""
    return None if loss is None else loss.model_dump(mode="json")
