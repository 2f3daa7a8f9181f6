"""core/warmup/preference.py, the warmup's preference losses: DPO / DPO+NLL / SFT math, response log-prob
sums, reference scoring, training."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from pydantic import ValidationError

from tests.helpers import MIXED_CORPUS, TINY, bpe_tokenizer, training_config
from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX, causal_lm_loss, collate, encode_pairs
from warmup_distill_kedro.core.models.modeling import build_model
from warmup_distill_kedro.core.training.batches import ShuffledBatches
from warmup_distill_kedro.core.training.loop import TrainingRun
from warmup_distill_kedro.core.warmup.preference import (
    PreferenceLossConfig,
    PreferencePair,
    collate_pairs,
    encode_preference_pairs,
    preference_loss,
    preference_loss_fn,
    sequence_logprobs,
    with_reference_logprobs,
)

torch.set_num_threads(1)

# Chosen and rejected differ in total response tokens, so mixing up their counts shows.
PROMPTS = [f"Question: what is {a} plus {b}?\nAnswer:" for a, b in [(1, 2), (12, 30), (5, 7), (40, 2)]] * 2
CHOSEN = [" 3 #### 3", " 42 #### 42", " 12 #### 12", " 42 #### 42"] * 2
REJECTED = [" 4 #### 5", " the cat sat on the mat #### 7", " 13 #### 13", " 38 #### 38 ####"] * 2


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(MIXED_CORPUS)


@pytest.fixture(scope="module")
def model(tokenizer):
    model = build_model(TINY, tokenizer, seed=0)
    model.eval()
    return model


@pytest.fixture(scope="module")
def pairs(tokenizer):
    return encode_preference_pairs(tokenizer, PROMPTS, CHOSEN, REJECTED, max_length=64)


# -- the loss as a pure function --------------------------------------------------------------------------
def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _expected(pc, pr, rc, rr, nll, config):
    """Float64 loss and its gradient w.r.t. the policy chosen / rejected sums, written out by hand."""
    n = len(pc)
    z = [config.beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])) for i in range(n)]
    dpo = -sum(_log_sigmoid(zi) for zi in z) / n
    # d(-log sigmoid(z))/dz = -(1 - sigmoid(z)) = -sigmoid(-z); dz/dpc = beta, dz/dpr = -beta.
    d_chosen = [-config.beta * math.exp(_log_sigmoid(-zi)) / n for zi in z]
    if config.loss == "sft":
        return nll, [0.0] * n, [0.0] * n, 1.0
    d_rejected = [-g for g in d_chosen]
    if config.loss == "dpo":
        return dpo, d_chosen, d_rejected, 0.0
    return dpo + config.nll_weight * nll, d_chosen, d_rejected, config.nll_weight


def _random_inputs(seed: int, n: int = 6):
    rng = random.Random(seed)
    pc, pr, rc, rr = ([rng.uniform(-60.0, -5.0) for _ in range(n)] for _ in range(4))
    return pc, pr, rc, rr, rng.uniform(0.5, 4.0)


@pytest.mark.parametrize("loss", ["dpo", "dpo_nll", "sft"])
@pytest.mark.parametrize("seed", [0, 1])
def test_preference_loss_matches_float64_formula(loss, seed):
    config = PreferenceLossConfig(loss=loss, beta=0.3, nll_weight=0.7)
    pc, pr, rc, rr, nll = _random_inputs(seed)
    policy_chosen = torch.tensor(pc, requires_grad=True)
    policy_rejected = torch.tensor(pr, requires_grad=True)
    chosen_nll = torch.tensor(nll, requires_grad=True)
    value, metrics = preference_loss(
        policy_chosen, policy_rejected, torch.tensor(rc), torch.tensor(rr), chosen_nll, config
    )
    value.backward()
    expected, d_chosen, d_rejected, d_nll = _expected(pc, pr, rc, rr, nll, config)
    assert value.dtype == torch.float32 and value.dim() == 0
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for got, want in [(policy_chosen.grad, d_chosen), (policy_rejected.grad, d_rejected)]:
        got = torch.zeros(len(pc)) if got is None else got  # sft never touches the sums
        assert got.tolist() == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert chosen_nll.grad is None if d_nll == 0 else chosen_nll.grad.item() == pytest.approx(d_nll)

    # Metrics, reported whatever the loss (sft included).
    chosen_rewards = [config.beta * (a - b) for a, b in zip(pc, rc, strict=True)]
    rejected_rewards = [config.beta * (a - b) for a, b in zip(pr, rr, strict=True)]
    n = len(pc)
    assert metrics["chosen_reward"] == pytest.approx(sum(chosen_rewards) / n, rel=1e-5)
    assert metrics["rejected_reward"] == pytest.approx(sum(rejected_rewards) / n, rel=1e-5)
    assert metrics["reward_margin"] == pytest.approx(
        (sum(chosen_rewards) - sum(rejected_rewards)) / n, abs=1e-5
    )
    wins = sum(c > r for c, r in zip(chosen_rewards, rejected_rewards, strict=True))
    assert 0 < wins < n  # the random inputs exercise both outcomes
    assert metrics["preference_accuracy"] == pytest.approx(wins / n)
    assert metrics["chosen_logp"] == pytest.approx(sum(pc) / n, rel=1e-6)
    assert metrics["rejected_logp"] == pytest.approx(sum(pr) / n, rel=1e-6)
    assert metrics["chosen_nll"] == pytest.approx(nll, rel=1e-6)


def test_policy_equal_to_reference_gives_log2():
    logp = torch.tensor([-12.5, -40.0, -3.25])
    other = torch.tensor([-20.0, -7.5, -33.0])
    value, metrics = preference_loss(
        logp, other, logp.clone(), other.clone(), torch.tensor(2.0), PreferenceLossConfig()
    )
    assert value.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["reward_margin"] == 0.0
    assert metrics["chosen_reward"] == metrics["rejected_reward"] == 0.0
    assert metrics["preference_accuracy"] == 0.0  # ties are not wins


def test_larger_margin_lowers_loss_monotonically():
    zeros = torch.zeros(1)
    points = []  # (beta * margin, loss) over several betas: the loss depends on their product only
    for beta in [0.05, 0.1, 0.5]:
        for margin in [-5.0, -1.0, 0.0, 0.5, 2.0, 10.0]:
            value, metrics = preference_loss(
                torch.tensor([margin]),
                zeros,
                zeros,
                zeros,
                torch.tensor(1.0),
                PreferenceLossConfig(beta=beta),
            )
            assert metrics["reward_margin"] == pytest.approx(beta * margin)
            points.append((beta * margin, value.item()))
    points.sort()
    for (m1, v1), (m2, v2) in zip(points, points[1:], strict=False):
        if m2 > m1 + 1e-9:
            assert v2 < v1, (m1, m2)
        else:
            assert v2 == pytest.approx(v1, abs=1e-6)  # equal beta * margin, equal loss (here 0 * beta)
    assert points[0][1] > math.log(2) > points[-1][1]


def test_dpo_nll_and_sft_identities():
    pc, pr, rc, rr, nll_value = _random_inputs(5)
    args = [torch.tensor(v) for v in (pc, pr, rc, rr)] + [torch.tensor(nll_value)]
    dpo, _ = preference_loss(*args, PreferenceLossConfig(loss="dpo", beta=0.2))
    for weight in [0.0, 0.5, 2.0]:
        dpo_nll, _ = preference_loss(*args, PreferenceLossConfig(loss="dpo_nll", beta=0.2, nll_weight=weight))
        assert (dpo_nll - dpo).item() == pytest.approx(weight * nll_value, abs=1e-5)
    sft, _ = preference_loss(*args, PreferenceLossConfig(loss="sft", beta=0.2))
    assert sft.item() == pytest.approx(nll_value, rel=1e-6)
    assert abs(sft.item() - dpo.item()) > 1e-3


def test_preference_loss_is_float32_on_bfloat16_inputs():
    # Values exact in bfloat16; beta * 3 = 0.3 is not, so bfloat16 arithmetic would be off by ~1e-3.
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.bfloat16) for v in (-5.0, -8.0, -4.0, -10.0))
    nll = torch.tensor(1.5, dtype=torch.bfloat16)
    for loss in ["dpo", "dpo_nll"]:
        config = PreferenceLossConfig(loss=loss, beta=0.1, nll_weight=0.3)
        value, _ = preference_loss(pc, pr, rc, rr, nll, config)
        expected, *_ = _expected([-5.0], [-8.0], [-4.0], [-10.0], 1.5, config)
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(expected, abs=1e-6)


def test_config_validation():
    assert PreferenceLossConfig() == PreferenceLossConfig(loss="dpo", beta=0.1, nll_weight=1.0)
    for bad_beta in [0.0, -0.1]:
        with pytest.raises(ValidationError, match="beta"):
            PreferenceLossConfig(beta=bad_beta)
    with pytest.raises(ValidationError, match="loss"):
        PreferenceLossConfig(loss="ipo")
    with pytest.raises(ValidationError, match="nll_weight"):
        PreferenceLossConfig(nll_weight=-1.0)
    with pytest.raises(ValidationError, match="betta"):
        PreferenceLossConfig(betta=0.2)


# -- encoding and collation -------------------------------------------------------------------------------
def test_encode_preference_pairs(tokenizer, pairs):
    chosen, _ = encode_pairs(tokenizer, PROMPTS, CHOSEN, max_length=64)
    rejected, _ = encode_pairs(tokenizer, PROMPTS, REJECTED, max_length=64)
    assert [p.chosen for p in pairs] == chosen
    assert [p.rejected for p in pairs] == rejected
    assert all(p.reference_chosen_logp == p.reference_rejected_logp == 0.0 for p in pairs)
    assert all(p.chosen.input_ids[-1] == tokenizer.eos_token_id for p in pairs)
    with pytest.raises(ValueError, match="3 prompts, 2 chosen and 3 rejected"):
        encode_preference_pairs(tokenizer, PROMPTS[:3], CHOSEN[:2], REJECTED[:3], max_length=64)
    with pytest.raises(ValueError, match="2 prompts, 2 chosen and 1 rejected"):
        encode_preference_pairs(tokenizer, PROMPTS[:2], CHOSEN[:2], REJECTED[:1], max_length=64)


def test_collate_pairs(tokenizer, pairs):
    with_refs = [
        PreferencePair(p.chosen, p.rejected, reference_chosen_logp=-1.5 * i, reference_rejected_logp=-2.0 - i)
        for i, p in enumerate(pairs[:3])
    ]
    batch = collate_pairs(with_refs, tokenizer.pad_token_id)
    side_keys = {"input_ids", "attention_mask", "labels"}
    assert set(batch) == {f"{s}_{k}" for s in ("chosen", "rejected") for k in side_keys} | {
        "reference_chosen_logp",
        "reference_rejected_logp",
    }
    width = max(len(e.input_ids) for p in with_refs for e in (p.chosen, p.rejected))
    for side in ("chosen", "rejected"):
        alone = collate([getattr(p, side) for p in with_refs], tokenizer.pad_token_id)
        for key in side_keys:
            got = batch[f"{side}_{key}"]
            assert got.shape == (3, width)
            n = alone[key].shape[1]  # the same rows, only padded further to the common width
            assert torch.equal(got[:, :n], alone[key])
            assert torch.all(
                got[:, n:] == {"input_ids": tokenizer.pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)
            )
    assert batch["reference_chosen_logp"].dtype == torch.float32
    assert batch["reference_chosen_logp"].tolist() == [0.0, -1.5, -3.0]
    assert batch["reference_rejected_logp"].tolist() == [-2.0, -3.0, -4.0]


# -- log-probs of a model ---------------------------------------------------------------------------------
def _manual_sum(model, example) -> tuple[float, int]:
    """Float64 sum of response-token log-probs of one unpadded sequence, from the model's logits."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([example.input_ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    total, count = 0.0, 0
    for t in range(1, len(example.input_ids)):
        if example.labels[t] != IGNORE_INDEX:
            total += float(logprobs[t - 1, example.labels[t]])
            count += 1
    return total, count


def test_sequence_logprobs_matches_manual_sum(tokenizer, model, pairs):
    examples = [p.rejected for p in pairs[:4]]
    assert len({len(e.input_ids) for e in examples}) > 1  # the batch has padding
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        sums, counts = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert sums.dtype == torch.float32 and sums.shape == (4,)
    for row, example in enumerate(examples):
        expected, n = _manual_sum(model, example)
        assert int(counts[row]) == n == sum(label != IGNORE_INDEX for label in example.labels)
        assert sums[row].item() == pytest.approx(expected, abs=1e-4)
    # The prompt is not scored: counting its tokens too would give a clearly different sum.
    everything = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    with torch.no_grad():
        all_sums, all_counts = sequence_logprobs(
            model, batch["input_ids"], batch["attention_mask"], everything
        )
    assert torch.all(all_counts > counts)
    assert torch.all(all_sums < sums - 1.0)


def test_sequence_logprobs_float32_under_bfloat16(tokenizer, model, pairs):
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    examples = [p.chosen for p in pairs[:4]] + [p.rejected for p in pairs[:4]]
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        sums, _ = sequence_logprobs(bf16, batch["input_ids"], batch["attention_mask"], batch["labels"])
        logits = bf16(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.dtype == torch.bfloat16 and sums.dtype == torch.float32
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    safe = targets.masked_fill(~mask, 0).unsqueeze(-1)

    def summed(logprobs):
        return (logprobs[:, :-1].gather(-1, safe).squeeze(-1).double() * mask).sum(-1)

    exact = summed(torch.log_softmax(logits.double(), dim=-1))
    assert torch.allclose(sums.double(), exact, atol=1e-4)
    # Control: the same sums taken in bfloat16 are visibly off, so the check above has teeth.
    in_bf16 = summed(torch.log_softmax(logits, dim=-1))
    assert (in_bf16 - exact).abs().max() > 1e-3


# -- reference scoring and the loss function --------------------------------------------------------------
def test_reference_logprobs_and_step_zero_loss(tokenizer, model, pairs):
    pad = tokenizer.pad_token_id
    scored = with_reference_logprobs(model, pairs, pad, batch_size=3)  # 8 pairs: a ragged last batch
    assert len(scored) == len(pairs)
    assert all(p.reference_chosen_logp == 0.0 for p in pairs)  # the input pairs are left as they were
    for pair, original in zip(scored, pairs, strict=True):
        assert pair.chosen == original.chosen and pair.rejected == original.rejected
        assert pair.reference_chosen_logp == pytest.approx(_manual_sum(model, pair.chosen)[0], abs=1e-4)
        assert pair.reference_rejected_logp == pytest.approx(_manual_sum(model, pair.rejected)[0], abs=1e-4)
    one_by_one = with_reference_logprobs(model, pairs, pad, batch_size=1)
    for a, b in zip(scored, one_by_one, strict=True):
        assert a.reference_chosen_logp == pytest.approx(b.reference_chosen_logp, abs=1e-4)
        assert a.reference_rejected_logp == pytest.approx(b.reference_rejected_logp, abs=1e-4)

    policy = copy.deepcopy(model)
    batch = collate_pairs(scored, pad)
    with torch.no_grad():
        loss, metrics = preference_loss_fn(PreferenceLossConfig())(policy, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["chosen_logp"] == pytest.approx(sum(p.reference_chosen_logp for p in scored) / 8, abs=1e-4)


def test_loss_fn_nll_matches_causal_lm_loss_and_split_forward(tokenizer, model, pairs):
    pad = tokenizer.pad_token_id
    scored = with_reference_logprobs(model, pairs, pad, batch_size=8)
    policy = copy.deepcopy(model)
    with torch.no_grad():  # move the policy off the reference so that the DPO term is not log 2
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = collate_pairs(scored, pad)
    # The same pairs with each side padded only to its own width: the loss takes two forward passes.
    split = {f"chosen_{k}": v for k, v in collate([p.chosen for p in scored], pad).items()}
    split |= {f"rejected_{k}": v for k, v in collate([p.rejected for p in scored], pad).items()}
    split |= {k: batch[k] for k in ("reference_chosen_logp", "reference_rejected_logp")}
    assert split["chosen_input_ids"].shape[1] != split["rejected_input_ids"].shape[1]
    with torch.no_grad():
        sft_nll, _ = causal_lm_loss(policy, collate([p.chosen for p in scored], pad))
        results = {}
        for loss in ["dpo", "dpo_nll", "sft"]:
            loss_fn = preference_loss_fn(PreferenceLossConfig(loss=loss, nll_weight=0.5))
            results[loss] = loss_fn(policy, batch)
            split_loss, split_metrics = loss_fn(policy, split)
            assert split_loss.item() == pytest.approx(results[loss][0].item(), abs=1e-5)
            for key, value in results[loss][1].items():
                assert split_metrics[key] == pytest.approx(value, abs=1e-4), key
    assert results["sft"][0].item() == pytest.approx(sft_nll.item(), abs=1e-5)
    assert results["dpo"][1]["chosen_nll"] == pytest.approx(sft_nll.item(), abs=1e-5)
    assert (results["dpo_nll"][0] - results["dpo"][0]).item() == pytest.approx(0.5 * sft_nll.item(), abs=1e-5)
    assert abs(results["dpo"][0].item() - math.log(2)) > 1e-4


def test_loss_fn_float32_with_bfloat16_model(tokenizer, model, pairs):
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    scored = with_reference_logprobs(bf16, pairs, tokenizer.pad_token_id, batch_size=8)
    batch = collate_pairs(scored, tokenizer.pad_token_id)
    loss, metrics = preference_loss_fn(PreferenceLossConfig(loss="dpo_nll"))(bf16, batch)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(math.log(2) + metrics["chosen_nll"], abs=1e-5)
    loss.backward()
    assert bf16.get_input_embeddings().weight.grad.abs().sum() > 0


# -- training ---------------------------------------------------------------------------------------------
def test_dpo_training_raises_preference(tokenizer, model, pairs):
    pad = tokenizer.pad_token_id
    reference = model
    scored = with_reference_logprobs(reference, pairs, pad, batch_size=8)
    loss_fn = preference_loss_fn(PreferenceLossConfig())
    eval_batch = collate_pairs(scored, pad)
    policy = copy.deepcopy(reference)

    def evaluate() -> tuple[float, dict[str, float]]:
        policy.eval()
        with torch.no_grad():
            _, metrics = loss_fn(policy, eval_batch)
        reference_gap = float(
            eval_batch["reference_chosen_logp"].mean() - eval_batch["reference_rejected_logp"].mean()
        )
        return metrics["chosen_logp"] - metrics["rejected_logp"] - reference_gap, metrics

    gap_before, before = evaluate()
    assert gap_before == pytest.approx(0.0, abs=1e-4)
    assert before["preference_accuracy"] == 0.0  # rewards are exactly 0: no pair is preferred yet

    config = training_config(max_steps=30, batch_size=4, learning_rate=1e-2, log_every=10)
    data = ShuffledBatches(scored, config.batch_size, lambda chunk: collate_pairs(chunk, pad), seed=0)
    result = TrainingRun(policy, loss_fn, data, config).run()
    assert result.steps == 30
    train_losses = [r["loss"] for r in result.history]
    assert train_losses[-1] < train_losses[0] < math.log(2) + 1e-3

    gap_after, after = evaluate()
    assert gap_after > 5.0  # about 26 nats on this data; 0 before training
    assert after["reward_margin"] == pytest.approx(0.1 * gap_after, rel=1e-3)
    assert after["preference_accuracy"] == 1.0
    # The reference itself was not trained.
    assert with_reference_logprobs(reference, pairs[:1], pad, 1)[0].reference_chosen_logp == pytest.approx(
        scored[0].reference_chosen_logp, abs=1e-6
    )


def test_dpo_hand_computed_value_and_gradient_sign():
    # beta 0.5; chosen moved +2 nats from the reference, rejected -1: margin = 0.5 * (2 - (-1)) = 1.5,
    # loss = -log sigmoid(1.5) = log(1 + e^-1.5) = 0.201413...
    policy_chosen = torch.tensor([-8.0], requires_grad=True)
    policy_rejected = torch.tensor([-12.0], requires_grad=True)
    loss, metrics = preference_loss(
        policy_chosen,
        policy_rejected,
        torch.tensor([-10.0]),
        torch.tensor([-11.0]),
        torch.tensor(0.0),
        PreferenceLossConfig(loss="dpo", beta=0.5),
    )
    assert loss.item() == pytest.approx(0.2014132779827524, abs=1e-6)
    assert metrics["reward_margin"] == pytest.approx(1.5)
    loss.backward()
    # Descending the loss raises the chosen log-prob and lowers the rejected one.
    assert policy_chosen.grad.item() < 0 < policy_rejected.grad.item()
    assert policy_chosen.grad.item() == pytest.approx(-0.5 * (1 - 1 / (1 + math.exp(-1.5))), abs=1e-6)


@pytest.mark.parametrize("loss", ["dpo", "dpo_nll"])
def test_the_teacher_reference_is_dpkds_length_normalized_dpo(loss):
    """reference: teacher: -log sigmoid(beta [(log q(y+) - log p(y+)) / |y+| - (log q(y-) - log p(y-)) / |y-|])
    (DPKD's sequence-level loss), against float64 with its gradient in the policy's sums."""
    config = PreferenceLossConfig(loss=loss, beta=0.3, nll_weight=0.7, reference="teacher")
    pc, pr, rc, rr, nll = _random_inputs(7)
    chosen_tokens, rejected_tokens = [3, 17, 8, 1, 40, 12], [9, 2, 30, 5, 6, 12]
    policy_chosen = torch.tensor(pc, requires_grad=True)
    policy_rejected = torch.tensor(pr, requires_grad=True)
    value, metrics = preference_loss(
        policy_chosen, policy_rejected, torch.tensor(rc), torch.tensor(rr), torch.tensor(nll), config,
        torch.tensor(chosen_tokens), torch.tensor(rejected_tokens),
    )  # fmt: skip
    value.backward()
    n, beta = len(pc), config.beta
    z = [beta * ((pc[i] - rc[i]) / chosen_tokens[i] - (pr[i] - rr[i]) / rejected_tokens[i]) for i in range(n)]
    expected = -sum(_log_sigmoid(zi) for zi in z) / n + (0.7 * nll if loss == "dpo_nll" else 0.0)
    slope = [-math.exp(_log_sigmoid(-zi)) / n for zi in z]  # d(-log sigmoid(z)) / dz, over the batch
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert policy_chosen.grad.tolist() == pytest.approx(
        [beta * s / c for s, c in zip(slope, chosen_tokens, strict=True)], rel=1e-4
    )
    assert policy_rejected.grad.tolist() == pytest.approx(
        [-beta * s / r for s, r in zip(slope, rejected_tokens, strict=True)], rel=1e-4
    )
    assert metrics["reward_margin"] == pytest.approx(sum(z) / n, rel=1e-5)
    unnormalized, _ = preference_loss(
        *(torch.tensor(v) for v in (pc, pr, rc, rr, nll)),
        PreferenceLossConfig(loss=loss, beta=0.3, nll_weight=0.7),
    )
    assert abs(unnormalized.item() - value.item()) > 1e-2
    with pytest.raises(ValueError, match="pass chosen_tokens and rejected_tokens"):
        preference_loss(*(torch.tensor(v) for v in (pc, pr, rc, rr, nll)), config)
