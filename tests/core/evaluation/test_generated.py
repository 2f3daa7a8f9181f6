"""core/evaluation/generated.py, evaluation by generation: Rouge-L over sampling seeds and the share of
sampled tokens the teacher rejects."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import SMALL, bpe_tokenizer
from warmup_distill_kedro.core.evaluation.generated import instruction_rouge, sampled_token_check
from warmup_distill_kedro.core.evaluation.metrics import rouge_l
from warmup_distill_kedro.core.generation.config import SamplingConfig
from warmup_distill_kedro.core.generation.sampling import generate
from warmup_distill_kedro.core.models.modeling import build_model
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids
from warmup_distill_kedro.core.tasks import RESPONSE_SEPARATOR
from warmup_distill_kedro.core.warmup.check import CheckConfig

torch.set_num_threads(1)

CORPUS = [
    "Instruction: Sort the numbers 4, 1, 3.\nResponse: 1, 3, 4",
    "Instruction: Name the largest of 7, 2, 9.\nResponse: The largest is 9.",
] * 20
SAMPLING = SamplingConfig(max_new_tokens=10, batch_size=4, show_progress=False)


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(SMALL, tokenizer, seed=0)


@pytest.fixture(scope="module")
def examples() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "example_id": ["a", "b", "c"],
            "prompt": [
                "Instruction: Sort the numbers 4, 1, 3.",
                "Instruction: Name the largest",
                "Instruction:",
            ],
            "response": ["1, 3, 4", "The largest is 9.", "9"],
            "references": [["1, 3, 4"], ["The largest is 9.", "9"], ["9"]],
        }
    )


def test_instruction_rouge_scores_every_seed_and_keeps_the_predictions(model, tokenizer, examples):
    scores, rows = instruction_rouge(model, tokenizer, examples, SAMPLING, seeds=[0, 1, 2])
    assert list(scores) == [0, 1, 2]
    assert len(rows) == 3 * len(examples) and set(rows["seed"]) == {0, 1, 2}
    references = dict(zip(examples["example_id"], examples["references"], strict=True))
    for row in rows.itertuples():
        assert not row.prediction.startswith(RESPONSE_SEPARATOR)
        assert row.rouge_l == pytest.approx(rouge_l(row.prediction, references[row.example_id]))
    for seed, score in scores.items():
        assert score == pytest.approx(rows[rows["seed"] == seed]["rouge_l"].mean())
    again, _ = instruction_rouge(model, tokenizer, examples, SAMPLING, seeds=[2, 0])
    assert again == {2: scores[2], 0: scores[0]}  # a seed's samples do not depend on what ran before


def test_instruction_rouge_samples_differ_across_seeds(model, tokenizer, examples):
    _, rows = instruction_rouge(model, tokenizer, examples, SAMPLING, seeds=[0, 1])
    assert rows[rows["seed"] == 0]["prediction"].tolist() != rows[rows["seed"] == 1]["prediction"].tolist()


def test_instruction_rouge_refuses_empty_inputs(model, tokenizer, examples):
    with pytest.raises(ValueError, match="no instruction examples"):
        instruction_rouge(model, tokenizer, examples.head(0), SAMPLING, seeds=[0])
    with pytest.raises(ValueError, match="seed"):
        instruction_rouge(model, tokenizer, examples, SAMPLING, seeds=[])


@pytest.mark.parametrize("tau", [0.05, 0.3])
def test_a_model_judging_itself_sees_its_own_sampling_probabilities(model, tokenizer, tau):
    """With itself as the teacher (temperature 1, no top-p), the teacher's probability of each sampled
    token is the probability the model sampled it with, EOS included: an independent check of the share."""
    prompts = ["Instruction: Sort the numbers", "Instruction: Name"] * 3
    sampling = SAMPLING.model_copy(update={"do_sample": True, "seed": 5})
    share, probabilities = sampled_token_check(
        model, tokenizer, model, tokenizer, prompts, sampling, CheckConfig(tau=tau)
    )
    generations = generate(model, tokenizer, prompts, sampling)
    expected = np.exp(
        np.concatenate(
            [
                np.array(g.logprobs + ([g.eos_logprob] if g.finished else []), dtype=np.float64)
                for g in generations
            ]
        )
    )
    np.testing.assert_allclose(probabilities, expected, rtol=1e-4, atol=1e-6)
    assert share == pytest.approx(float(np.mean(expected < tau)))


def test_sampled_token_check_with_a_teacher_of_another_tokenizer(model, tokenizer):
    """The teacher reads each sampled response as its own tokens (EOS after the finished ones): the share
    is the fraction of those tokens it gives p < tau, computed here in float64, one sequence at a time,
    with a tau between two of those probabilities so that the right share is neither 0 nor 1."""
    other = bpe_tokenizer(CORPUS, 270)
    teacher = build_model(SMALL, other, seed=1)
    prompts = ["Instruction: Sort the numbers", "Instruction: Name", "Instruction:", "Instruction: Name the"]
    sampling = SAMPLING.model_copy(update={"do_sample": True, "seed": 1})
    generations = generate(model, tokenizer, prompts, sampling)
    expected = _teacher_probabilities(teacher, other, prompts, generations)
    # Not the student's tokens: a share over those would not have this many terms.
    assert len(expected) > 20 and len(expected) != sum(len(g.token_ids) + g.finished for g in generations)
    ordered = np.sort(expected)
    third = len(ordered) // 3
    k = third + int(np.argmax(ordered[third + 1 : 2 * third + 1] / ordered[third : 2 * third]))
    tau = float(np.sqrt(ordered[k] * ordered[k + 1]))  # between the (k+1)-th and (k+2)-th smallest

    share, probabilities = sampled_token_check(
        model, tokenizer, teacher, other, prompts, sampling, CheckConfig(tau=tau)
    )
    np.testing.assert_allclose(probabilities, expected, rtol=1e-4, atol=1e-7)
    assert share == (k + 1) / len(expected)


def _teacher_probabilities(teacher, teacher_tokenizer, prompts, generations) -> np.ndarray:
    """The teacher's probability of each of its tokens of each response (prompt and response tokenized
    apart, as the check does), from one float64 forward pass per sequence."""
    eos_id, _ = eos_and_pad_ids(teacher_tokenizer)
    teacher64 = copy.deepcopy(teacher).double().eval()
    probabilities = []
    for prompt, generation in zip(prompts, generations, strict=True):
        prompt_ids = teacher_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = teacher_tokenizer(generation.text, add_special_tokens=False)["input_ids"]
        response_ids += [eos_id] if generation.finished else []
        with torch.no_grad():
            logits = teacher64(torch.tensor([prompt_ids + response_ids])).logits[
                0, :, : len(teacher_tokenizer)
            ]
        logprobs = logits.log_softmax(-1)
        for t, token in enumerate(response_ids):
            probabilities.append(float(logprobs[len(prompt_ids) - 1 + t, token].exp()))
    return np.asarray(probabilities)


def test_math_accuracy_scores_strictly_and_flexibly():
    from tests.helpers import MATH_CORPUS, answering_model
    from warmup_distill_kedro.core.evaluation.generated import math_accuracy

    tok = bpe_tokenizer(MATH_CORPUS + ["The answer is so"])
    prompts = {"Question: 2+3?\nAnswer:": " 2 + 3 = 5\n#### 5", "Question: 4+4?\nAnswer:": " 4 + 4 = 8 so 8"}
    prompts["Question: 9-1?\nAnswer:"] = " 9 - 1 = 7"
    model = answering_model(tok, prompts)
    examples = pd.DataFrame(
        {"example_id": ["a", "b", "c"], "prompt": list(prompts), "answer": ["5", "8", "8"]}
    )
    sampling = SAMPLING.model_copy(update={"max_new_tokens": 32})
    accuracy, rows = math_accuracy(model, tok, examples, sampling, across_processes=False)
    assert rows["correct"].tolist() == [True, False, False]  # only the `#### N` line counts
    assert rows["correct_flexible"].tolist() == [True, True, False]  # the last number counts
    assert accuracy == pytest.approx(1 / 3)
