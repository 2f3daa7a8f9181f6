"""Nodes of the `probe` pipeline: the student samples responses to the training prompts."""

from __future__ import annotations

import logging

import pandas as pd

from warmup_distill_kedro.core.generation.sampling import generate
from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.core.models.tokenization import vocabulary_fingerprint
from warmup_distill_kedro.core.warmup.check import token_char_starts
from warmup_distill_kedro.pipelines.probe.params import ProbeParams

logger = logging.getLogger(__name__)

ROLLOUT_COLUMNS = (
    "prompt_id", "task", "prompt", "answer", "sample_index", "response", "token_ids", "char_starts",
    "logprobs", "eos_logprob", "finished", "n_tokens", "vocabulary",
)  # fmt: skip


def probe(student: Checkpoint, train_examples: pd.DataFrame, params: ProbeParams) -> pd.DataFrame:
    """`n_samples` student responses per training prompt: one row per sample.

    Rows carry the text, the sampled ids with the student's log-probability of each, where each token
    starts in the text (so a teacher with another tokenizer can map its flags back), and whether the
    response ended with EOS or was cut at `max_new_tokens`.

    Under several processes (torch.distributed initialized) every process probes the same prompts:
    each samples a share of the batches and all of them return the whole table (see
    `core.sampling.generate_from_ids`; the samples are those of one process, up to the device's
    floating-point determinism).
    """
    prompts = train_examples.drop_duplicates("prompt").iloc[params.skip_prompts :]
    if params.max_prompts is not None:
        prompts = prompts.head(params.max_prompts)
    if prompts.empty:
        raise ValueError(
            f"probe: no training prompts left to probe ({train_examples['prompt'].nunique()} distinct prompts, "
            f"probe.skip_prompts is {params.skip_prompts})"
        )
    # Sample-major order: the i-th sample of every prompt before the (i+1)-th, so a smaller n_samples
    # gives a prefix of the same rollouts batch by batch.
    repeated = pd.concat([prompts.assign(sample_index=i) for i in range(params.n_samples)], ignore_index=True)
    tokenizer = student.tokenizer
    generations = generate(
        student.model,
        tokenizer,
        repeated["prompt"].tolist(),
        params.sampling(),
        desc="probe",
        across_processes=True,
    )
    rollouts = pd.DataFrame(
        {
            "prompt_id": repeated["example_id"],
            "task": repeated["task"],
            "prompt": repeated["prompt"],
            "answer": repeated["answer"],
            "sample_index": repeated["sample_index"],
            "response": [g.text for g in generations],
            "token_ids": [g.token_ids for g in generations],
            "char_starts": [token_char_starts(tokenizer, g.token_ids) for g in generations],
            "logprobs": [g.logprobs for g in generations],
            "eos_logprob": [g.eos_logprob for g in generations],
            "finished": [g.finished for g in generations],
            "n_tokens": [len(g.token_ids) for g in generations],
            "vocabulary": vocabulary_fingerprint(tokenizer),
        }
    )
    logger.info(
        "probe: %d rollouts of %d prompts, %.1f%% finished, %.1f tokens on average",
        len(rollouts),
        len(prompts),
        100 * rollouts["finished"].mean(),
        rollouts["n_tokens"].mean(),
    )
    return rollouts.sort_values(["prompt_id", "sample_index"], kind="stable").reset_index(drop=True)
