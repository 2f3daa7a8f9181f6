"""Probe, check and evaluation generation shared across 2 processes (gloo on CPU), against one process.

Two processes with the environment `accelerate launch --num_processes 2 --cpu` gives them call the
stage functions with `across_processes=True` on the same inputs. The first call joins the gloo group;
each process must return the full, ordered results, equal to what one process computes: greedy and
sampled generations (a batch keeps its composition and its seed wherever it runs), the teacher's
scores of the rollouts, the teacher's continuations and math exact match. A deadline on the wait kills
the processes, so a hung collective fails the test instead of blocking it.

The processes are forked, as DataLoader workers are: they start with everything imported (spawned ones
re-import torch and transformers, 15-40 s on 2 shared cores) and with the session's single torch thread
(conftest), so no OpenMP pool is carried across the fork.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate.state import PartialState

from tests.helpers import MATH_CORPUS, SMALL_UNTIED, answering_model, bpe_tokenizer
from warmup_distill_kedro.core.evaluation.generated import math_accuracy
from warmup_distill_kedro.core.generation.config import SamplingConfig
from warmup_distill_kedro.core.generation.sampling import generate
from warmup_distill_kedro.core.models.modeling import (
    Checkpoint,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from warmup_distill_kedro.core.processes import process_share
from warmup_distill_kedro.core.warmup.check import (
    CheckConfig,
    Rollout,
    check_rollouts,
    correct_rollouts,
    token_char_starts,
)

torch.set_num_threads(1)

WORLD = 2
WAIT_S = 90  # the 2-process run takes ~1 s (forked) on 2 shared cores
# 11 prompts of different lengths: 6 batches of 2 (the last one short), so rank 0 gets 3 and rank 1 gets 3.
PROMPTS = [
    "Question: Tom has 12 apples",
    "Question: Mia has 9 pens and gives away 4. How many now?\nAnswer:",
    "Question:",
    "Question: Tom has 1",
    "Question: Mia has 9 pens",
    "Question: Tom has 12 apples and buys 5 more. How many now?\nAnswer:",
    "Mia",
    "Question: Mia has 9 pens and gives",
    "Question: Tom has 12 apples and buys 5 more.",
    "Answer: 12 + 5",
    "Question: Mia has",
]


# What the answering model writes after five math prompts, and the right answers: three of them right.
ANSWERS = {
    PROMPTS[5]: " 12 + 5 = 17. #### 17",
    PROMPTS[1]: " 9 - 4 = 5. #### 5",
    PROMPTS[0]: " #### 12",
    PROMPTS[8]: " #### 17",
    PROMPTS[4]: " #### 9",
}
ANSWERED = ["17", "5", "13", "17", "5"]


def run_stages(folder: Path, across_processes: bool) -> dict[str, Any]:
    """What probe, check and evaluate compute, as plain data."""
    student, teacher = load_checkpoint(folder / "student"), load_checkpoint(folder / "teacher")
    tok = student.tokenizer
    greedy = SamplingConfig(max_new_tokens=8, batch_size=2, show_progress=False)
    sampled = greedy.model_copy(update={"do_sample": True, "temperature": 1.0, "seed": 3})
    out: dict[str, Any] = {}
    for name, config in {
        "greedy": greedy,
        "sampled": sampled,
        "one_batch": greedy.model_copy(update={"batch_size": 64}),  # rank 1 has no batch
    }.items():
        generations = generate(student.model, tok, PROMPTS, config, across_processes=across_processes)
        out[name] = [(g.text, g.token_ids, g.logprobs, g.finished, g.eos_logprob) for g in generations]
    rollouts = [
        Rollout(p, text, ids, token_char_starts(tok, ids), logprobs, finished, eos)
        for p, (text, ids, logprobs, finished, eos) in zip(PROMPTS, out["sampled"], strict=True)
    ]
    config = CheckConfig(batch_size=3, continuation=SamplingConfig(max_new_tokens=6, batch_size=2))
    checked = check_rollouts(
        teacher.model, tok, rollouts, True, config, show_progress=False, across_processes=across_processes
    )
    out["teacher_scores"] = [
        (c.scored.token_ids, c.scored.logprobs.tolist(), c.scored.argmax.tolist(), c.flags.tolist())
        for c in checked
    ]
    out["corrected"] = correct_rollouts(
        teacher.model, tok, rollouts, checked, config, across_processes=across_processes
    )
    examples = pd.DataFrame(
        {"example_id": list("abcd"), "prompt": PROMPTS[:4], "answer": ["17", "5", "5", "17"]}
    )
    rate, rows = math_accuracy(student.model, tok, examples, greedy, across_processes=across_processes)
    out["math"] = (rate, rows["prediction"].tolist())
    # A model that answers 3 of 5 right, in batches on both processes: a score that is not 0.
    answering = answering_model(tok, ANSWERS)
    problems = pd.DataFrame({"example_id": list("vwxyz"), "prompt": list(ANSWERS), "answer": ANSWERED})
    long_enough = greedy.model_copy(update={"max_new_tokens": 24})
    rate, rows = math_accuracy(answering, tok, problems, long_enough, across_processes=across_processes)
    out["math_answered"] = (rate, rows["example_id"].tolist(), rows["correct"].tolist())
    return out


def _worker(rank: int, port: int, folder: str, out_dir: str) -> None:
    """One process of `accelerate launch --num_processes 2 --cpu`: the launcher's environment, no group
    yet; the first shared call joins it (core.processes.join_launched_processes)."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    PartialState._reset_state()  # forked: forget any accelerate state the test session made
    try:
        result = run_stages(Path(folder), across_processes=True)
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        result["share"] = process_share(6, across_processes=True)
        with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as handle:
            pickle.dump(result, handle)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    tokenizer = bpe_tokenizer(MATH_CORPUS)
    folder = tmp_path_factory.mktemp("sharded")
    save_checkpoint(Checkpoint(build_model(SMALL_UNTIED, tokenizer, seed=0), tokenizer), folder / "student")
    save_checkpoint(Checkpoint(build_model(SMALL_UNTIED, tokenizer, seed=1), tokenizer), folder / "teacher")
    return folder


@pytest.mark.timeout(WAIT_S + 60)
def test_two_processes_return_the_full_ordered_results_of_one(checkpoints, tmp_path):
    context = mp.start_processes(
        _worker,
        args=(_free_port(), str(checkpoints), str(tmp_path)),
        nprocs=WORLD,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + WAIT_S
    while not context.join(timeout=1):  # re-raises a worker's exception
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} processes did not finish within {WAIT_S} s (a hung collective?)")

    single = run_stages(checkpoints, across_processes=True)  # no process group: plain one-process code
    assert not dist.is_initialized()
    ranks = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]
    assert [r.pop("share") for r in ranks] == [[0, 2, 4], [1, 3, 5]]  # each did its own share
    for rank, result in enumerate(ranks):
        assert len(result["greedy"]) == len(PROMPTS)
        for key in single:
            assert result[key] == single[key], f"rank {rank}: {key} differs from one process"
    # The comparison is not vacuous: the prompts' continuations differ, and some rollouts were flagged.
    assert len({tuple(ids) for _, ids, *_ in single["greedy"]}) > 1
    assert single["sampled"] != single["greedy"]
    assert any(text is not None for text in single["corrected"])
    assert single["math_answered"] == (3 / 5, list("vwxyz"), [True, True, False, True, False])
