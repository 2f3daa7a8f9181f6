"""The `probe` pipeline on an in-memory catalog: the student's rollouts of the training prompts after the
skipped ones, one row per sample, with the ids, log-probabilities and character offsets the check reads."""

from __future__ import annotations

from tests.helpers import run_pipeline
from warmup_distill_kedro.core.models.tokenization import vocabulary_fingerprint
from warmup_distill_kedro.core.warmup.check import token_char_starts
from warmup_distill_kedro.core.warmup.probe import ROLLOUT_COLUMNS, ProbeConfig
from warmup_distill_kedro.pipelines.probe.pipeline import create_pipeline

PARAMS = ProbeConfig(
    n_samples=2, max_new_tokens=6, batch_size=8, seed=0, skip_prompts=1, max_prompts=3, show_progress=False
)


def test_rollouts_of_the_probed_prompts(student, splits):
    train = splits[0]
    outputs = run_pipeline(
        create_pipeline(), {"student_model": student, "train_examples": train, "params:probe": PARAMS}
    )
    rollouts = outputs["rollouts"]
    assert list(rollouts.columns) == list(ROLLOUT_COLUMNS)
    probed = train.drop_duplicates("prompt").iloc[1:4]  # skip 1, then 3 prompts
    assert len(rollouts) == 3 * 2
    assert sorted(set(rollouts["prompt_id"])) == sorted(probed["example_id"])
    assert rollouts.groupby("prompt_id")["sample_index"].apply(sorted).tolist() == [[0, 1]] * 3
    assert rollouts["prompt_id"].tolist() == sorted(rollouts["prompt_id"])  # ordered by prompt, then sample
    by_id = probed.set_index("example_id")
    for row in rollouts.itertuples():
        assert (
            row.prompt == by_id.loc[row.prompt_id, "prompt"]
            and row.answer == by_id.loc[row.prompt_id, "answer"]
        )
        assert len(row.token_ids) == len(row.logprobs) == len(row.char_starts) == row.n_tokens <= 6
        assert all(lp <= 0.0 for lp in row.logprobs)
        assert list(row.char_starts) == token_char_starts(student.tokenizer, list(row.token_ids))
        assert row.finished == (row.eos_logprob is not None)
        assert student.tokenizer.decode(list(row.token_ids)) == row.response
    assert set(rollouts["vocabulary"]) == {vocabulary_fingerprint(student.tokenizer)}
    assert rollouts["response"].nunique() > 1  # sampled, not one greedy answer
