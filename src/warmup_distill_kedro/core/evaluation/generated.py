"""Evaluation of a model on held-out examples: what it generates, scored.

* ``math_accuracy``: exact match of the final ``#### N`` under greedy decoding (strict), and of the last
  number of the response (flexible, in the rows' ``correct_flexible``), as lm-evaluation-harness scores
  GSM8K (core/tasks/answers.py).
* ``instruction_rouge``: Rouge-L of sampled responses, one mean per sampling seed.
* ``sampled_token_check``: the share of the model's sampled tokens the teacher's check rule rejects.

Several processes (torch.distributed initialized, world size > 1): the generation-based scores are
collectives by default (`across_processes=True`): every process calls them with the same model and
examples, each generates a share of the batches and every process gets every prediction, in order
(see `core.generation.sampling.generate_from_ids`). Pass `across_processes=False` where one process evaluates alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from warmup_distill_kedro.core.evaluation.metrics import rouge_l
from warmup_distill_kedro.core.generation.config import SamplingConfig
from warmup_distill_kedro.core.generation.sampling import generate
from warmup_distill_kedro.core.models.tokenization import vocabulary_fingerprint
from warmup_distill_kedro.core.tasks import RESPONSE_SEPARATOR, math_exact_match, math_flexible_match
from warmup_distill_kedro.core.warmup.check import CheckConfig, Rollout, check_rollouts, token_char_starts


def math_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: pd.DataFrame,
    sampling: SamplingConfig,
    desc: str = "math eval",
    across_processes: bool = True,
) -> tuple[float, pd.DataFrame]:
    """Exact match of the final `#### N` answer under greedy decoding; returns the rate and the rows, whose
    `correct` is that strict match and `correct_flexible` the match of the response's last number."""
    if examples.empty:
        raise ValueError("no math examples to evaluate")
    greedy = sampling.model_copy(update={"do_sample": False})
    generations = generate(
        model, tokenizer, examples["prompt"].tolist(), greedy, desc=desc, across_processes=across_processes
    )
    predictions = examples[["example_id", "prompt", "answer"]].copy()
    predictions["prediction"] = [g.text for g in generations]
    predictions["finished"] = [g.finished for g in generations]
    pairs = list(zip(predictions["prediction"], examples["answer"], strict=True))
    predictions["correct"] = [math_exact_match(text, answer) for text, answer in pairs]
    predictions["correct_flexible"] = [math_flexible_match(text, answer) for text, answer in pairs]
    return float(predictions["correct"].mean()), predictions


def instruction_rouge(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: pd.DataFrame,
    sampling: SamplingConfig,
    seeds: Sequence[int],
    desc: str = "rouge eval",
    across_processes: bool = True,
) -> tuple[dict[int, float], pd.DataFrame]:
    """Mean Rouge-L (max over each prompt's references) of sampled responses, one score per seed.

    Sampled decoding averaged over seeds, as DSKD's evaluation does; the rows keep every prediction.
    """
    if examples.empty:
        raise ValueError("no instruction examples to evaluate")
    if not seeds:
        raise ValueError("instruction_rouge needs at least one seed")
    scores: dict[int, float] = {}
    rows = []
    references = [_references(row) for row in examples.itertuples()]
    for seed in seeds:
        config = sampling.model_copy(update={"do_sample": True, "seed": int(seed)})
        generations = generate(
            model,
            tokenizer,
            examples["prompt"].tolist(),
            config,
            desc=f"{desc} seed {seed}",
            across_processes=across_processes,
        )
        predictions = [g.text.removeprefix(RESPONSE_SEPARATOR).strip() for g in generations]
        per_example = [rouge_l(p, r) for p, r in zip(predictions, references, strict=True)]
        scores[int(seed)] = float(sum(per_example) / len(per_example))
        rows.append(
            examples[["example_id", "prompt"]].assign(
                seed=int(seed), prediction=predictions, rouge_l=per_example
            )
        )
    return scores, pd.concat(rows, ignore_index=True)


def _references(row: Any) -> list[str]:
    references = getattr(row, "references", None)
    if references is None or len(references) == 0:
        return [row.response]
    return [str(r) for r in references]


def sampled_token_check(
    student: PreTrainedModel,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher: PreTrainedModel,
    teacher_tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    check: CheckConfig,
    across_processes: bool = True,
) -> tuple[float, np.ndarray]:
    """The share of the student's sampled tokens the teacher's check rule rejects, and the teacher's
    probability of every sampled token (the EOS decision included): the mismatch warmup targets."""
    generations = generate(
        student,
        student_tokenizer,
        prompts,
        sampling.model_copy(update={"do_sample": True}),
        across_processes=across_processes,
    )
    rollouts = [
        Rollout(
            prompt=prompt,
            response=g.text,
            token_ids=g.token_ids,
            char_starts=token_char_starts(student_tokenizer, g.token_ids),
            logprobs=g.logprobs,
            finished=g.finished,
            eos_logprob=g.eos_logprob,
        )
        for prompt, g in zip(prompts, generations, strict=True)
    ]
    same_vocabulary = vocabulary_fingerprint(student_tokenizer) == vocabulary_fingerprint(teacher_tokenizer)
    checked = check_rollouts(
        teacher,
        teacher_tokenizer,
        rollouts,
        same_vocabulary,
        check,
        show_progress=sampling.show_progress,
        across_processes=across_processes,
        prompt_format=sampling.prompt_format,
    )
    flags = np.concatenate([c.flags for c in checked]) if checked else np.zeros(0, dtype=bool)
    if flags.size == 0:
        raise ValueError("sampled_token_check: the student sampled no tokens")
    probabilities = np.exp(np.concatenate([c.scored.logprobs.astype(np.float64) for c in checked]))
    return float(flags.mean()), probabilities
