"""Where the KD sequences come from (docs/method.md).

- `off_policy`: the gold responses (a `ShuffledBatches` over them is all it takes).
- `on_policy` (GKD): each batch is replaced, with probability `lmbda`, by the student's own fresh
  samples for the same prompts, drawn with the shared sampling function from the model being trained.
- `adaptive` (DistiLLM): the student-generated share starts at `initial_share` and grows by
  `share_step` whenever the validation loss stops improving; generated batches go to a replay buffer
  and are reused with probability `replay_ratio`, which saves most of the sampling cost.
- `sequence_kd`: the teacher's own greedy responses replace the gold ones (prepared once, before
  training, by the pipeline).

`StudentSampledBatches` implements the two dynamic modes. Every choice it makes is drawn from an RNG
seeded by (seed, position), so a run that resumes at a position makes the same choices.
"""

from __future__ import annotations

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
from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX, EncodedExample, collate
from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids
from warmup_distill_kedro.core.tasks import RESPONSE_SEPARATOR
from warmup_distill_kedro.core.training.batches import ShuffledBatches
from warmup_distill_kedro.core.training.config import TrainingConfig

logger = logging.getLogger(__name__)

KDDataMode = Literal["off_policy", "on_policy", "adaptive", "sequence_kd"]


class KDDataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: KDDataMode = "off_policy"
    skip_examples: int = Field(0, ge=0, description="skip the first N training examples")
    max_examples: int | None = Field(None, gt=0, description="use at most N training examples")
    lmbda: float = Field(0.5, ge=0, le=1, description="on_policy: probability of a student-sampled batch")
    initial_share: float = Field(0.0, ge=0, le=1, description="adaptive: starting student-sampled share")
    share_step: float = Field(0.1, gt=0, le=1, description="adaptive: growth when validation stalls")
    max_share: float = Field(1.0, ge=0, le=1)
    replay_ratio: float = Field(0.5, ge=0, lt=1, description="adaptive: reuse a buffered batch this often")
    buffer_batches: int = Field(64, gt=0, description="adaptive: generated batches kept for replay")
    sampling: SamplingConfig = SamplingConfig(do_sample=True, max_new_tokens=64, show_progress=False)


class StudentSampledBatches:
    """Gold batches, some replaced by the student's own samples for the same prompts."""

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
        self.prompt_lengths = [_prompt_length(example) for example in gold]
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.seed = seed
        self.max_length = max_length
        self.order = ShuffledBatches(list(range(len(gold))), batch_size, list, seed)
        self.share = config.lmbda if config.mode == "on_policy" else config.initial_share
        self.replay: list[list[EncodedExample]] = []
        self.best_validation = float("inf")
        self.counts = {"gold": 0, "sampled": 0, "replayed": 0}
        _, self.pad_id = eos_and_pad_ids(tokenizer)

    def batch(self, position: int) -> dict[str, torch.Tensor]:
        rng = random.Random(self.seed * 1_000_003 + position)
        indices = self.order.batch(position)
        if rng.random() >= self.share:
            self.counts["gold"] += 1
            return collate([self.gold[i] for i in indices], self.pad_id)
        if self.config.mode == "adaptive" and self.replay and rng.random() < self.config.replay_ratio:
            self.counts["replayed"] += 1
            return collate(rng.choice(self.replay), self.pad_id)
        examples = self._sample(indices, position)
        if self.config.mode == "adaptive":
            self.replay = [*self.replay, examples][-self.config.buffer_batches :]
        self.counts["sampled"] += 1
        return collate(examples, self.pad_id)

    def _sample(self, indices: list[int], position: int) -> list[EncodedExample]:
        """The current student's responses to the batch's prompts, as training sequences."""
        prompts = [self.gold[i].input_ids[: self.prompt_lengths[i]] for i in indices]
        sampling = self.config.sampling.model_copy(
            update={"seed": self.seed * 1_000_003 + position, "show_progress": False}
        )
        generations = generate_from_ids(self.model, self.tokenizer, prompts, sampling, desc="on-policy")
        eos_id, _ = eos_and_pad_ids(self.tokenizer)
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
        """adaptive: a validation loss that did not improve raises the student-sampled share."""
        if self.config.mode != "adaptive":
            return
        if loss >= self.best_validation:
            self.share = min(self.config.max_share, self.share + self.config.share_step)
        self.best_validation = min(self.best_validation, loss)

    def state_dict(self) -> dict[str, Any]:
        return {
            "share": self.share,
            "replay": self.replay,
            "best": self.best_validation,
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.share, self.replay = state["share"], list(state["replay"])
        self.best_validation, self.counts = state["best"], dict(state["counts"])


def _prompt_length(example: EncodedExample) -> int:
    for position, label in enumerate(example.labels):
        if label != IGNORE_INDEX:
            return position
    return len(example.labels)


# -- the KD examples every cell shares --------------------------------------------------------------------------
def prepare_kd_examples(
    teacher: Checkpoint, train_examples: pd.DataFrame, config: KDDataConfig
) -> pd.DataFrame:
    """The KD training set every cell shares: the selected training examples; for `sequence_kd`, with
    the teacher's greedy responses in place of the gold ones (the gold kept as `gold_response`)."""
    examples = train_examples.iloc[config.skip_examples :]
    if config.max_examples is not None:
        examples = examples.head(config.max_examples)
    if examples.empty:
        raise ValueError(
            f"distill: no training examples left after distill.data.skip_examples={config.skip_examples} "
            f"({len(train_examples)} in the training split)"
        )
    examples = examples.reset_index(drop=True).assign(gold_response=lambda t: t["response"])
    if config.mode != "sequence_kd":
        return examples
    greedy = config.sampling.model_copy(update={"do_sample": False})
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
