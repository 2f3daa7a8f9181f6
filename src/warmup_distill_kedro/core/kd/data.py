"""Where the KD sequences come from (docs/method.md, "KD data").

- `off_policy`: the gold responses (a `ShuffledBatches` over them is all it takes).
- `on_policy` (GKD, arXiv 2306.13649): each batch is replaced, with probability `lmbda`, by the student's
  own fresh samples for the same prompts, drawn with the shared sampling function from the model being
  trained.
- `adaptive` (DistiLLM, arXiv 2402.03898, as its `finetune.py` and `distillm/buffer.py` do): a threshold,
  starting at `initial_threshold`, is the probability of a student-generated batch; it rises by
  `threshold_step` (at most to 1) whenever the validation loss rises by `loss_eps` or more over a
  reference, which is the first validation loss and moves only when the threshold is raised. Below the
  threshold, a batch is sampled fresh with probability `threshold x s(t)` (schedule `replay`:
  decreasing s = 1 - t/T, constant 1/2, increasing t/T, t/T the training progress) and replayed
  otherwise; fresh samples go into a buffer of `capacity` examples (first in, first out), and until it
  is full every student-generated batch is sampled fresh. A replayed batch is `batch_size` single
  examples drawn from the buffer without replacement.
- `sequence_kd`: the teacher's own greedy responses replace the gold ones (prepared once, before
  training: `prepare_kd_examples`).

The CE term of the loss is computed on gold (or teacher-written) responses only: batches the student
sampled carry `STUDENT_SAMPLED`, and their loss is kd_rate x KD (`distillation_loss(..., ce=False)`).

`StudentSampledBatches` implements the two dynamic modes. Every choice it makes is drawn from an RNG
seeded by (seed, position), so a run that resumes at a position makes the same choices.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Sequence
from typing import Any, Literal

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from warmup_distill_kedro.core.generation.config import SamplingConfig
from warmup_distill_kedro.core.generation.sampling import generate, generate_from_ids
from warmup_distill_kedro.core.models.chat import end_of_turn_id, require_chat_template
from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX, EncodedExample, collate
from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids
from warmup_distill_kedro.core.tasks import RESPONSE_SEPARATOR
from warmup_distill_kedro.core.training.batches import ShuffledBatches
from warmup_distill_kedro.core.training.config import TrainingConfig

logger = logging.getLogger(__name__)

KDDataMode = Literal["off_policy", "on_policy", "adaptive", "sequence_kd"]


# The batch key that marks a batch the student sampled itself (its labels are no gold to imitate).
STUDENT_SAMPLED = "student_sampled"


class KDDataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: KDDataMode = "off_policy"
    skip_examples: int = Field(0, ge=0, description="skip the first N training examples")
    max_examples: int | None = Field(None, gt=0, description="use at most N training examples")
    cut_off: Literal["keep", "drop"] = Field(
        "keep",
        description="sequence_kd: a teacher response cut at max_new_tokens is kept without an end-of-sequence "
        "token (keep) or left out (drop)",
    )
    lmbda: float = Field(0.5, ge=0, le=1, description="on_policy: probability of a student-sampled batch")
    initial_threshold: float = Field(
        0.0, ge=0, le=1, description="adaptive: starting probability of a student-generated batch"
    )
    threshold_step: float = Field(0.1, gt=0, le=1, description="adaptive: rise of the threshold")
    loss_eps: float = Field(
        0.1, ge=0, description="adaptive: the threshold rises when validation loss rises this much"
    )
    replay: Literal["decreasing", "constant", "increasing"] = Field(
        "decreasing",
        description="adaptive: how the fresh share of student-generated batches follows progress",
    )
    capacity: int = Field(1000, gt=0, description="adaptive: examples the replay buffer holds")
    sampling: SamplingConfig = SamplingConfig(do_sample=True, max_new_tokens=64, show_progress=False)


class StudentSampledBatches:
    """Gold batches, some replaced by the student's own samples for the same prompts (see the module doc)."""

    def __init__(
        self,
        gold: Sequence[EncodedExample],
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: KDDataConfig,
        batch_size: int,
        seed: int,
        max_length: int,
    ) -> None:
        if config.mode not in ("on_policy", "adaptive"):
            raise ValueError(f"StudentSampledBatches serves on_policy and adaptive, not {config.mode!r}")
        self.gold = gold
        # The prompt is what the labels mask: the student answers it afresh.
        self.prompt_lengths = [prompt_length(example) for example in gold]
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.seed = seed
        self.max_length = max_length
        self.order = ShuffledBatches(list(range(len(gold))), batch_size, list, seed)
        self.batch_size = self.order.batch_size
        self.threshold = config.lmbda if config.mode == "on_policy" else config.initial_threshold
        self.reference_loss: float | None = None  # adaptive: the validation loss the threshold rises against
        self.progress = 0.0  # t / T, from begin_step
        self.buffer: list[EncodedExample] = []
        self.counts = {"gold": 0, "sampled": 0, "replayed": 0}
        _, self.pad_id = eos_and_pad_ids(tokenizer)

    @property
    def fresh_threshold(self) -> float:
        """adaptive: below it a batch is sampled fresh (DistiLLM's samp_threshold)."""
        schedule = {"decreasing": 1.0 - self.progress, "constant": 0.5, "increasing": self.progress}
        return self.threshold * schedule[self.config.replay]

    def begin_step(self, step: int, max_steps: int) -> None:
        self.progress = step / max_steps

    def batch(self, position: int) -> dict[str, torch.Tensor]:
        rng = random.Random(self.seed * 1_000_003 + position)
        indices = self.order.batch(position)
        draw = rng.random()
        if self.config.mode == "on_policy":
            kind = "sampled" if draw < self.threshold else "gold"
        elif draw < self.fresh_threshold or (
            draw < self.threshold and len(self.buffer) < self.config.capacity
        ):
            kind = "sampled"
        else:
            kind = "replayed" if draw < self.threshold else "gold"
        self.counts[kind] += 1
        if kind == "gold":
            return collate([self.gold[i] for i in indices], self.pad_id)
        if kind == "replayed":
            examples = rng.sample(self.buffer, min(self.batch_size, len(self.buffer)))
        else:
            examples = self._sample(indices, position)
            if self.config.mode == "adaptive":
                self.buffer = [*self.buffer, *examples][-self.config.capacity :]
        return {**collate(examples, self.pad_id), STUDENT_SAMPLED: torch.tensor(True)}

    def _sample(self, indices: list[int], position: int) -> list[EncodedExample]:
        """The current student's responses to the batch's prompts, as training sequences (an EOS only
        where the student ended its response)."""
        prompts = [self.gold[i].input_ids[: self.prompt_lengths[i]] for i in indices]
        sampling = self.config.sampling.model_copy(
            update={"seed": self.seed * 1_000_003 + position, "show_progress": False}
        )
        generations = generate_from_ids(self.model, self.tokenizer, prompts, sampling, desc="on-policy")
        eos_id = end_of_turn_id(self.tokenizer, sampling.prompt_format)
        examples = []
        for prompt, generation in zip(prompts, generations, strict=True):
            response = generation.token_ids + ([eos_id] if generation.finished else [])
            response = response[: max(self.max_length - len(prompt), 0)]
            examples.append(
                EncodedExample(
                    input_ids=prompt + response,
                    labels=[IGNORE_INDEX] * len(prompt) + response,
                    truncated=not generation.finished,
                )
            )
        return examples

    def observe_validation(self, loss: float) -> None:
        """adaptive: the first validation loss is the reference; one at least loss_eps above it raises the
        threshold by threshold_step, and becomes the reference."""
        if self.config.mode != "adaptive":
            return
        if self.reference_loss is None:
            self.reference_loss = loss
        elif loss >= self.reference_loss + self.config.loss_eps:
            self.threshold = min(1.0, self.threshold + self.config.threshold_step)
            self.reference_loss = loss

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (the buffer's examples as dicts), so that the training state loads with
        `torch.load(..., weights_only=True)`."""
        return {
            "threshold": self.threshold,
            "reference_loss": self.reference_loss,
            "buffer": [dataclasses.asdict(example) for example in self.buffer],
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.threshold, self.reference_loss = state["threshold"], state["reference_loss"]
        self.buffer = [EncodedExample(**example) for example in state["buffer"]]
        self.counts = dict(state["counts"])


def prompt_length(example: EncodedExample) -> int:
    for position, label in enumerate(example.labels):
        if label != IGNORE_INDEX:
            return position
    return len(example.labels)


# -- the KD examples every cell shares --------------------------------------------------------------------------
def prepare_kd_examples(
    teacher: Checkpoint, train_examples: pd.DataFrame, config: KDDataConfig
) -> pd.DataFrame:
    """The KD training set every cell shares: the selected training examples; for `sequence_kd`, with the
    teacher's greedy responses in place of the gold ones (the gold kept as `gold_response`).

    `finished` says whether each response ended (gold ones do; a teacher response may be cut at
    `sampling.max_new_tokens`): only those are encoded with an end-of-sequence token. With
    `cut_off: drop` the cut ones are left out.
    """
    examples = train_examples.iloc[config.skip_examples :]
    if config.max_examples is not None:
        examples = examples.head(config.max_examples)
    if examples.empty:
        raise ValueError(
            f"distill: no training examples left after distill.data.skip_examples={config.skip_examples} "
            f"({len(train_examples)} in the training split)"
        )
    # The format the teacher writes in and every cell encodes with (the teacher cache reads it from here).
    prompt_format = config.sampling.prompt_format
    examples = examples.reset_index(drop=True).assign(
        gold_response=lambda t: t["response"], finished=True, prompt_format=prompt_format
    )
    if prompt_format == "chat":
        require_chat_template(teacher.tokenizer, "distill.data.sampling.prompt_format")
    if config.mode != "sequence_kd":
        return examples
    greedy = config.sampling.model_copy(update={"do_sample": False})
    generations = generate(
        teacher.model, teacher.tokenizer, examples["prompt"].tolist(), greedy, desc="teacher writes"
    )
    # The generated text starts with the separator the task puts between prompt and response.
    examples = examples.assign(
        response=[g.text.removeprefix(RESPONSE_SEPARATOR) for g in generations],
        finished=[g.finished for g in generations],
    )
    n_cut = int((~examples["finished"]).sum())
    logger.info(
        "sequence_kd: the teacher wrote %d responses, %d cut at max_new_tokens %d (%s)",
        len(examples), n_cut, greedy.max_new_tokens, "dropped" if config.cut_off == "drop" else "kept without EOS",
    )  # fmt: skip
    if config.cut_off == "drop":
        examples = examples[examples["finished"]].reset_index(drop=True)
        if examples.empty:
            raise ValueError(
                "distill: every response the teacher wrote was cut at distill.data.sampling.max_new_tokens "
                f"({greedy.max_new_tokens}) and distill.data.cut_off is drop: raise max_new_tokens, or keep them"
            )
    return examples


def select_sft_examples(train_examples: pd.DataFrame, n_examples: int | None) -> pd.DataFrame:
    """The gold examples of the plain-SFT baseline (objective `sft`): the student's labelled data, which
    may be far fewer than the prompts KD gets the teacher's supervision on (None: all of them)."""
    examples = train_examples if n_examples is None else train_examples.head(n_examples)
    if examples.empty:
        raise ValueError("distill: no training examples for the sft baseline (the training split is empty)")
    return examples.reset_index(drop=True)


# -- batch sources ---------------------------------------------------------------------------------------------
def gold_batches(
    encoded: Sequence[EncodedExample], tokenizer: PreTrainedTokenizerBase, training: TrainingConfig
) -> ShuffledBatches:
    """The examples as they are, shuffled per epoch by the training seed (every cell sees the same order)."""
    _, pad_id = eos_and_pad_ids(tokenizer)
    return ShuffledBatches(encoded, training.batch_size, lambda b: collate(b, pad_id), training.seed)


def kd_batches(
    encoded: Sequence[EncodedExample],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: KDDataConfig,
    training: TrainingConfig,
    max_length: int,
) -> ShuffledBatches | StudentSampledBatches:
    """Gold batches (off_policy, sequence_kd), or gold batches partly replaced by the samples of `model`,
    the student being trained (on_policy, adaptive)."""
    if config.mode in ("on_policy", "adaptive"):
        return StudentSampledBatches(
            encoded, model, tokenizer, config, training.batch_size, training.seed, max_length
        )
    return gold_batches(encoded, tokenizer, training)
