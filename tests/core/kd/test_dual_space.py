"""core/kd/dual_space.py, DSKD and DSKD-CMA: config validation, parameter groups, masking (padding and prompt
positions change nothing), gradient routing, the identity check, agreement with kd_loss and with a loop
reference of the cross-model attention, vocabulary trimming, projector pre-training, and short training runs."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from pydantic import ValidationError
from transformers import PreTrainedModel, Qwen2ForCausalLM

from tests.helpers import SMALL, TINY, bpe_tokenizer
from warmup_distill_kedro.core.generation.config import SamplingConfig
from warmup_distill_kedro.core.generation.sampling import generate
from warmup_distill_kedro.core.kd.divergences import OBJECTIVES
from warmup_distill_kedro.core.kd.dual_space import (
    DSKDConfig,
    StudentWithProjectors,
    collate_dual,
    dskd_cma_loss,
    dskd_cma_terms,
    dskd_loss,
    dskd_terms,
    encode_dual,
    projector_pretraining_loss,
)
from warmup_distill_kedro.core.kd.losses import kd_loss
from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX, causal_lm_loss, collate, encode_pairs
from warmup_distill_kedro.core.models.modeling import build_model
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids
from warmup_distill_kedro.core.training.batches import ShuffledBatches
from warmup_distill_kedro.core.training.config import TrainingConfig
from warmup_distill_kedro.core.training.loop import TrainingRun

torch.set_num_threads(1)

MAX_LENGTH = 32
BATCH = 16
TEACHER_SIZE = SMALL
D_TEACHER = TEACHER_SIZE.hidden_size  # 32
# Untied: the LM head and the input embeddings are separate tensors, so gradient checks can tell them apart.
STUDENT_SIZE = TINY.model_copy(update={"tie_word_embeddings": False})
METRICS = {
    "loss",
    "ce",
    "kd",
    "kd_student",
    "kd_teacher",
    "ce_t2s",
    "t2s_accuracy",
    "tokens",
    "teacher_tokens",
}


def _corpus(n: int = 64, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    ops = [("plus", lambda a, b: a + b), ("times", lambda a, b: a * b), ("minus", lambda a, b: a - b)]
    prompts, responses = [], []
    for _ in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        word, op = rng.choice(ops)
        prompts.append(f"Question: what is {a} {word} {b}?")
        responses.append(f" Answer: {op(a, b)}")
    return prompts, responses


PROMPTS, RESPONSES = _corpus()


def _pad(tokenizer) -> int:
    return eos_and_pad_ids(tokenizer)[1]


def _sft(model: PreTrainedModel, tokenizer, steps: int, lr: float = 1e-2) -> PreTrainedModel:
    examples, _ = encode_pairs(tokenizer, PROMPTS, RESPONSES, MAX_LENGTH)
    batch = collate(examples, _pad(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss, _ = causal_lm_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.fixture(scope="module")
def tokenizers():
    texts = [p + r for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    student = bpe_tokenizer(texts, 300, min_frequency=1)
    teacher = bpe_tokenizer(texts, 272, min_frequency=1)
    return student, teacher


@pytest.fixture(scope="module")
def teacher(tokenizers):
    """Same tokenizer as the student, trained a little so that it is not random."""
    return _sft(build_model(TEACHER_SIZE, tokenizers[0], seed=1), tokenizers[0], steps=40)


@pytest.fixture(scope="module")
def cross_teacher(tokenizers):
    """Its own (smaller) tokenizer."""
    return _sft(build_model(TEACHER_SIZE, tokenizers[1], seed=1), tokenizers[1], steps=40)


@pytest.fixture(scope="module")
def student(tokenizers):
    """A briefly warmed-up student: its head is no longer at its near-zero initialisation."""
    return _sft(build_model(STUDENT_SIZE, tokenizers[0], seed=2), tokenizers[0], steps=10)


@pytest.fixture(scope="module")
def batches(tokenizers):
    examples, _ = encode_pairs(tokenizers[0], PROMPTS, RESPONSES, MAX_LENGTH)
    return [collate(examples[i : i + BATCH], _pad(tokenizers[0])) for i in range(0, len(examples), BATCH)]


@pytest.fixture(scope="module")
def dual_batches(tokenizers):
    student_tok, teacher_tok = tokenizers
    s, t = encode_dual(student_tok, teacher_tok, PROMPTS, RESPONSES, MAX_LENGTH)
    return [
        collate_dual(s[i : i + BATCH], t[i : i + BATCH], _pad(student_tok), _pad(teacher_tok))
        for i in range(0, len(s), BATCH)
    ]


def _wrapper(student: PreTrainedModel, cross: bool, d_teacher: int = D_TEACHER) -> StudentWithProjectors:
    return StudentWithProjectors(copy.deepcopy(student), d_teacher, cross_attention=cross, seed=3)


def _pretrain(wrapper, teacher, batches, steps: int = 30, lr: float = 3e-2) -> StudentWithProjectors:
    optimizer = torch.optim.AdamW(wrapper.projector_parameters(), lr=lr)
    for step in range(steps):
        loss, _ = projector_pretraining_loss(wrapper, teacher, batches[step % len(batches)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return wrapper


@pytest.fixture(scope="module")
def plain_wrapper(student, teacher, batches):
    return _pretrain(_wrapper(student, cross=False), teacher, batches)


@pytest.fixture(scope="module")
def cma_wrapper(student, cross_teacher, dual_batches):
    return _pretrain(_wrapper(student, cross=True), cross_teacher, dual_batches)


@pytest.fixture(params=["dskd", "cma"])
def setup(request, plain_wrapper, cma_wrapper, teacher, cross_teacher, batches, dual_batches):
    """(wrapper copy, teacher, batch, terms function, loss function) for either path."""
    if request.param == "dskd":
        return copy.deepcopy(plain_wrapper), teacher, batches[0], dskd_terms, dskd_loss
    return copy.deepcopy(cma_wrapper), cross_teacher, dual_batches[0], dskd_cma_terms, dskd_cma_loss


def _response_next(labels: torch.Tensor) -> torch.Tensor:
    """[B, T]: the positions whose next label is a response token."""
    following = torch.full_like(labels, IGNORE_INDEX)
    following[:, :-1] = labels[:, 1:]
    return following != IGNORE_INDEX


def _all_keys(batch):
    return ("", "teacher_") if "teacher_labels" in batch else ("",)


# -- config -------------------------------------------------------------------------------------------------
def test_config_defaults_and_options():
    config = DSKDConfig()
    assert (config.divergence, config.temperature, config.kd_rate, config.projector_lr) == (
        "fkl",
        2.0,
        0.5,
        1e-3,
    )
    assert config.chunk_size is None and config.options == {}
    assert DSKDConfig(divergence="js", options={"beta": 0.3}).options == {"beta": 0.3, "normalized": False}


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"divergence": "kl"}, "divergence", ", ".join(OBJECTIVES)),
        ({"options": {"alpha": 0.2}}, "options", "it takes no options"),
        ({"divergence": "js", "options": {"alpha": 0.2}}, "options", "it accepts: beta, normalized"),
        ({"divergence": "skl", "options": {"alpha": 1.5}}, "options", "alpha"),
        ({"temperature": 0}, "temperature", "greater than 0"),
        ({"kd_rate": 1.5}, "kd_rate", "less than or equal to 1"),
        ({"projector_lr": -1e-3}, "projector_lr", "greater than 0"),
        ({"chunk_size": 0}, "chunk_size", "greater than 0"),
        ({"objective": "fkl"}, "objective", "Extra inputs are not permitted"),
    ],
)
def test_config_errors_name_the_field(fields, field, says):
    with pytest.raises(ValidationError) as error:
        DSKDConfig(**fields)
    assert [e["loc"][0] for e in error.value.errors()] == [field]
    assert says in str(error.value)


# -- the wrapper --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cross", [False, True])
def test_parameter_groups_cover_everything_once(student, cross):
    wrapper = _wrapper(student, cross)
    groups = wrapper.parameter_groups(student_lr=5e-4, projector_lr=1e-3)
    assert [g["lr"] for g in groups] == [5e-4, 1e-3]
    ids = [[id(p) for p in g["params"]] for g in groups]
    assert set(ids[0]) == {id(p) for p in wrapper.student.parameters()}
    projectors = [wrapper.t2s, wrapper.s2t] + ([wrapper.query] if cross else [])
    assert set(ids[1]) == {id(p) for m in projectors for p in m.parameters()}
    assert not set(ids[0]) & set(ids[1])
    assert len(ids[0]) + len(ids[1]) == len(list(wrapper.parameters()))
    assert (wrapper.query is not None) == cross
    assert wrapper.t2s.weight.shape == (16, D_TEACHER) and wrapper.s2t.weight.shape == (D_TEACHER, 16)
    if cross:
        assert wrapper.query.weight.shape == (2 * D_TEACHER, 2 * 16)
    optimizer = torch.optim.AdamW(groups)
    assert [g["lr"] for g in optimizer.param_groups] == [5e-4, 1e-3]


# -- values, masks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cross", [False, True])
def test_the_projectors_start_from_the_seed_whatever_ran_before(student, cross):
    """The global RNG's state depends on what ran before (a resumed run has run other code than an
    uninterrupted one): the projectors are drawn from the seed alone, and leave the global RNG as it was."""
    torch.manual_seed(1)
    first = StudentWithProjectors(copy.deepcopy(student), D_TEACHER, cross_attention=cross, seed=7)
    after = torch.get_rng_state()
    torch.manual_seed(2)
    torch.rand(5)
    second = StudentWithProjectors(copy.deepcopy(student), D_TEACHER, cross_attention=cross, seed=7)
    other_seed = StudentWithProjectors(copy.deepcopy(student), D_TEACHER, cross_attention=cross, seed=8)
    for a, b, c in zip(
        first.projector_parameters(),
        second.projector_parameters(),
        other_seed.projector_parameters(),
        strict=True,
    ):
        assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(1)
    assert torch.equal(torch.get_rng_state(), after)  # the global RNG is left where it was


def test_metrics_are_finite_and_complete(setup):
    wrapper, teacher, batch, terms_fn, loss_fn = setup
    loss, metrics = loss_fn(wrapper, teacher, batch, DSKDConfig(kd_rate=0.3))
    assert set(metrics) == METRICS
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["tokens"] == _response_next(batch["labels"]).sum().item()
    prefix = "teacher_" if "teacher_labels" in batch else ""
    assert metrics["teacher_tokens"] == _response_next(batch[prefix + "labels"]).sum().item()
    assert metrics["kd"] == pytest.approx(metrics["kd_student"] + metrics["ce_t2s"] + metrics["kd_teacher"])
    assert metrics["loss"] == pytest.approx(0.7 * metrics["ce"] + 0.3 * metrics["kd"], rel=1e-6)
    assert loss.item() == pytest.approx(metrics["loss"])
    assert 0 < metrics["t2s_accuracy"] < 1  # pre-trained projectors: some positions aligned, not all
    terms = terms_fn(wrapper, teacher, batch, DSKDConfig())
    assert terms.t2s_logits.shape[:2] == batch["labels"].shape
    assert not (terms.t2s_correct & ~_response_next(batch["labels"])).any()


@contextmanager
def _perturbed_last_hidden(model: PreTrainedModel, positions: torch.Tensor, scale: float = 10.0) -> Iterator:
    """Add noise to the final-norm output (the last hidden state, hence also the logits) at positions."""
    generator = torch.Generator().manual_seed(0)

    def hook(module, inputs, output):
        noise = torch.randn(output.shape, generator=generator) * scale
        return output + noise * positions.unsqueeze(-1).to(output.dtype)

    handle = model.model.norm.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _metrics(setup_tuple, batch, cma_std="position"):
    """cma_std position: each position normalised alone, the variant that padding cannot change."""
    wrapper, teacher, _, _, loss_fn = setup_tuple
    with torch.no_grad():
        return loss_fn(wrapper, teacher, batch, DSKDConfig(divergence="js", cma_std=cma_std))[1]


def test_padding_positions_change_nothing(setup):
    batch = setup[2]
    generator = torch.Generator().manual_seed(1)
    perturbed = dict(batch)
    for prefix in _all_keys(batch):
        ids, attention = batch[prefix + "input_ids"], batch[prefix + "attention_mask"]
        assert (attention == 0).any(), "the batch needs padding for this test to mean something"
        noise = torch.randint(0, 200, ids.shape, generator=generator)
        perturbed[prefix + "input_ids"] = torch.where(attention == 0, noise, ids)
    assert _metrics(setup, perturbed) == pytest.approx(_metrics(setup, batch), rel=1e-6, abs=1e-7)


def test_the_official_whole_batch_std_depends_on_padding(cma_wrapper, cross_teacher, dual_batches):
    """The DSKD code divides by one std over the padded batch (its default here): adding padding to the
    teacher side changes the loss; per-position normalisation does not."""
    batch = dual_batches[2]
    padded = dict(batch)
    extra = 7
    for key, value in (
        ("teacher_input_ids", 1),
        ("teacher_attention_mask", 0),
        ("teacher_labels", IGNORE_INDEX),
    ):
        padded[key] = torch.nn.functional.pad(batch[key], (0, extra), value=value)
    setup_tuple = (cma_wrapper, cross_teacher, None, None, dskd_cma_loss)
    assert _metrics(setup_tuple, padded, "position") == pytest.approx(
        _metrics(setup_tuple, batch, "position"), rel=1e-5
    )
    assert _metrics(setup_tuple, padded, "batch")["loss"] != pytest.approx(
        _metrics(setup_tuple, batch, "batch")["loss"], rel=1e-4
    )


def test_prompt_and_padding_positions_change_nothing(setup):
    """Perturb both models' last hidden states (and so their logits) wherever the next label is not a
    response token: nothing changes. Perturbing response positions does change the loss."""
    wrapper, teacher, batch = setup[0], setup[1], setup[2]
    prefix = "teacher_" if "teacher_labels" in batch else ""
    student_counts, teacher_counts = _response_next(batch["labels"]), _response_next(batch[prefix + "labels"])
    base = _metrics(setup, batch)
    with (
        _perturbed_last_hidden(wrapper.student, ~student_counts),
        _perturbed_last_hidden(teacher, ~teacher_counts),
    ):
        masked = _metrics(setup, batch)
    assert masked == pytest.approx(base, rel=1e-6, abs=1e-7)
    with _perturbed_last_hidden(teacher, teacher_counts):
        assert _metrics(setup, batch)["loss"] != pytest.approx(base["loss"], rel=1e-4)
    with _perturbed_last_hidden(wrapper.student, student_counts):
        assert _metrics(setup, batch)["loss"] != pytest.approx(base["loss"], rel=1e-4)


# -- gradients ----------------------------------------------------------------------------------------------
def _grads(term: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    grads = torch.autograd.grad(term, list(params.values()), retain_graph=True, allow_unused=True)
    return dict(zip(params, grads, strict=True))


def _nonzero(grad: torch.Tensor | None) -> bool:
    return grad is not None and bool(grad.abs().sum() > 0)


def test_gradients_flow_where_the_method_says(setup):
    wrapper, teacher, batch, terms_fn, loss_fn = setup
    cross = wrapper.query is not None
    params = {
        "head": wrapper.student.lm_head.weight,
        "embed": wrapper.student.model.embed_tokens.weight,
        "body": wrapper.student.model.layers[0].mlp.up_proj.weight,
        "t2s": wrapper.t2s.weight,
        "s2t": wrapper.s2t.weight,
    }
    if cross:
        params["query"] = wrapper.query.weight
    terms = terms_fn(wrapper, teacher, batch, DSKDConfig())
    assert terms.t2s_correct.any()  # kd_student is not trivially zero

    ce_t2s = _grads(terms.ce_t2s, params)
    assert ce_t2s["head"] is None and ce_t2s["embed"] is None and ce_t2s["body"] is None  # detached head
    assert _nonzero(ce_t2s["t2s"]) and ce_t2s["s2t"] is None
    if cross:
        assert _nonzero(ce_t2s["query"])

    ce = _grads(terms.ce, params)
    assert _nonzero(ce["head"]) and _nonzero(ce["body"])
    assert ce["t2s"] is None and ce["s2t"] is None

    kd_student = _grads(terms.kd_student, params)
    assert _nonzero(kd_student["head"]) and _nonzero(kd_student["body"])
    assert kd_student["t2s"] is None and kd_student["s2t"] is None  # the target z_t2s is detached
    if cross:
        assert kd_student["query"] is None

    kd_teacher = _grads(terms.kd_teacher, params)
    assert _nonzero(kd_teacher["s2t"]) and _nonzero(kd_teacher["body"])
    assert kd_teacher["head"] is None and kd_teacher["t2s"] is None
    if cross:
        assert _nonzero(kd_teacher["query"])

    teacher.zero_grad(set_to_none=True)
    loss, _ = loss_fn(wrapper, teacher, batch, DSKDConfig())
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in wrapper.projector_parameters())


# -- exact values -------------------------------------------------------------------------------------------
def test_identity_projectors_reproduce_the_student(student, batches):
    """Teacher = the student, projectors = identity: z_t2s == z_s, both KD terms vanish, ce_t2s == ce."""
    wrapper = _wrapper(student, cross=False, d_teacher=16)
    teacher = copy.deepcopy(wrapper.student)
    with torch.no_grad():
        for projector in (wrapper.t2s, wrapper.s2t):
            projector.weight.copy_(torch.eye(16))
            projector.bias.zero_()
    batch = batches[0]
    for divergence in ("fkl", "rkl", "js", "akl"):
        terms = dskd_terms(wrapper, teacher, batch, DSKDConfig(divergence=divergence))
        with torch.no_grad():
            logits = wrapper.student(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        torch.testing.assert_close(terms.t2s_logits, logits, atol=1e-5, rtol=1e-5)
        assert abs(terms.kd_student.item()) < 1e-5, divergence
        assert abs(terms.kd_teacher.item()) < 1e-5
        assert terms.ce_t2s.item() == pytest.approx(terms.ce.item(), abs=1e-5)
    # and a perturbed projector breaks it
    with torch.no_grad():
        wrapper.s2t.weight.add_(0.3 * torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    assert dskd_terms(wrapper, teacher, batch, DSKDConfig()).kd_teacher.item() > 1e-3


def _forward(model, ids, attention):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
    return out.hidden_states[-1], out.logits


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_dskd_terms_are_kd_loss_on_hand_projected_logits(plain_wrapper, teacher, batches, chunk_size):
    wrapper, batch = plain_wrapper, batches[1]
    config = DSKDConfig(divergence="skl", options={"alpha": 0.3}, temperature=1.5, chunk_size=chunk_size)
    terms = dskd_terms(wrapper, teacher, batch, config)

    ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    h_t, z_t = _forward(teacher, ids, attention)
    h_s, z_s = _forward(wrapper.student, ids, attention)
    with torch.no_grad():
        z_t2s = (h_t @ wrapper.t2s.weight.T + wrapper.t2s.bias) @ wrapper.student.lm_head.weight.T
        z_s2t = (h_s @ wrapper.s2t.weight.T + wrapper.s2t.bias) @ teacher.lm_head.weight.T
    mask = _response_next(labels)
    kd_student = kd_loss("skl", z_s, z_t2s, mask, temperature=1.5, alpha=0.3)
    kd_teacher = kd_loss("fkl", z_s2t, z_t, mask, temperature=1.5)
    ce_t2s = torch.nn.functional.cross_entropy(z_t2s[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    accuracy = ((z_t2s.argmax(-1) == torch.roll(labels, -1, dims=1)) & mask).sum() / mask.sum()

    torch.testing.assert_close(terms.t2s_logits, z_t2s, atol=1e-5, rtol=1e-5)
    assert terms.kd_student.item() == pytest.approx(kd_student.item(), rel=1e-5)
    assert terms.kd_teacher.item() == pytest.approx(kd_teacher.item(), rel=1e-5)
    assert terms.ce_t2s.item() == pytest.approx(ce_t2s.item(), rel=1e-5)
    assert terms.combine(0.5)[1]["t2s_accuracy"] == pytest.approx(accuracy.item())
    assert terms.kd_student.item() > 1e-3 and terms.kd_teacher.item() > 1e-3


def _cma_reference(wrapper, teacher, batch, config):
    """The cross-model attention example by example, response position by response position."""
    s_ids, s_labels = batch["input_ids"], batch["labels"]
    t_ids, t_labels = batch["teacher_input_ids"], batch["teacher_labels"]
    h_s, z_s = _forward(wrapper.student, s_ids, batch["attention_mask"])
    h_t, z_t = _forward(teacher, t_ids, batch["teacher_attention_mask"])
    e_s, e_t = wrapper.student.model.embed_tokens.weight, teacher.model.embed_tokens.weight
    w_s, w_t = wrapper.student.lm_head.weight, teacher.lm_head.weight
    rows = {"z_s": [], "z_t2s": [], "gold": [], "z_s2t": [], "z_t": []}
    with torch.no_grad():
        for b in range(s_ids.shape[0]):
            si = [i for i in range(s_ids.shape[1] - 1) if s_labels[b, i + 1] != IGNORE_INDEX]
            tj = [j for j in range(t_ids.shape[1] - 1) if t_labels[b, j + 1] != IGNORE_INDEX]
            gold = s_labels[b, [i + 1 for i in si]]
            queries = wrapper.query(torch.cat([e_s[s_ids[b, si]], e_s[gold]], dim=-1))
            t_target = e_t[t_labels[b, [j + 1 for j in tj]]]
            keys = torch.cat([e_t[t_ids[b, tj]], t_target], dim=-1)
            keys = keys / keys.std(dim=-1, keepdim=True)
            hidden = h_t[b, tj]
            values = wrapper.t2s(
                hidden / hidden.std(dim=-1, keepdim=True) + t_target / t_target.std(dim=-1, keepdim=True)
            )
            scores = queries @ keys.T / math.sqrt(2 * D_TEACHER)
            rows["z_t2s"].append((scores.softmax(-1) @ values) @ w_s.T)
            rows["z_s"].append(z_s[b, si])
            rows["gold"].append(gold)
            rows["z_s2t"].append((scores.T.softmax(-1) @ wrapper.s2t(h_s[b, si])) @ w_t.T)
            rows["z_t"].append(z_t[b, tj])
    rows = {k: torch.cat(v) for k, v in rows.items()}
    kept = rows["z_t2s"].argmax(-1) == rows["gold"]
    kd_student = kd_loss(
        config.divergence, rows["z_s"], rows["z_t2s"], kept, config.temperature, **config.options
    )
    all_teacher = torch.ones(rows["z_t"].shape[0], dtype=torch.bool)
    kd_teacher = kd_loss("fkl", rows["z_s2t"], rows["z_t"], all_teacher, config.temperature)
    ce_t2s = torch.nn.functional.cross_entropy(rows["z_t2s"], rows["gold"])
    return rows, kept, kd_student * kept.sum() / kept.numel(), kd_teacher, ce_t2s


def test_cma_terms_match_a_loop_reference(cma_wrapper, cross_teacher, dual_batches):
    """The per-position variants, example by example."""
    config = DSKDConfig(
        divergence="rkl", temperature=1.3, cma_std="position", cma_teacher_kl="per_teacher_token"
    )
    batch = dual_batches[2]
    terms = dskd_cma_terms(cma_wrapper, cross_teacher, batch, config)
    rows, kept, kd_student, kd_teacher, ce_t2s = _cma_reference(cma_wrapper, cross_teacher, batch, config)
    mask = _response_next(batch["labels"])
    torch.testing.assert_close(terms.t2s_logits[mask], rows["z_t2s"], atol=1e-5, rtol=1e-5)
    assert torch.equal(terms.t2s_correct[mask], kept) and not terms.t2s_correct[~mask].any()
    assert 0 < kept.sum() < kept.numel()
    assert terms.kd_student.item() == pytest.approx(kd_student.item(), rel=1e-5)
    assert terms.kd_teacher.item() == pytest.approx(kd_teacher.item(), rel=1e-5)
    assert terms.ce_t2s.item() == pytest.approx(ce_t2s.item(), rel=1e-5)
    assert terms.kd_student.item() > 1e-4 and terms.kd_teacher.item() > 1e-3


def _cma_official(wrapper, teacher, batch, config):
    """DualSpaceKDWithCMA.compute_dual_space_kd_loss_with_cma of the DSKD repository, line by line on this
    project's batch (its `target` is the label each position predicts), each term divided by the student's
    response tokens as the repository's loss_denom does: (kd_student, kd_teacher, ce_t2s)."""
    from warmup_distill_kedro.core.kd.divergences import divergence

    target = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    teacher_target = torch.nn.functional.pad(batch["teacher_labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    pad_mask, teacher_pad_mask = target.ne(IGNORE_INDEX), teacher_target.ne(IGNORE_INDEX)
    hiddens, logits = _forward(wrapper.student, batch["input_ids"], batch["attention_mask"])
    teacher_hiddens, teacher_logits = _forward(
        teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"]
    )
    stu_embed, tea_embed = wrapper.student.model.embed_tokens, teacher.model.embed_tokens
    with torch.no_grad():
        formal_target = torch.where(pad_mask, target, torch.zeros_like(target))
        formal_input = torch.where(pad_mask, batch["input_ids"], torch.zeros_like(target))
        stu_index = torch.cat([stu_embed(formal_input), stu_embed(formal_target)], -1)
        formal_t_target = torch.where(teacher_pad_mask, teacher_target, torch.zeros_like(teacher_target))
        formal_t_input = torch.where(
            teacher_pad_mask, batch["teacher_input_ids"], torch.zeros_like(teacher_target)
        )
        tea_target_embeds = tea_embed(formal_t_target)
        tea_index = torch.cat([tea_embed(formal_t_input), tea_target_embeds], -1)
        norm_tea_index = tea_index / tea_index.std()
        norm_tea_target = tea_target_embeds / tea_target_embeds.std()
        norm_teacher_hiddens = teacher_hiddens / teacher_hiddens.std()
        q = wrapper.query(stu_index).float()
        v_s = wrapper.s2t(hiddens).float()
        v_t = wrapper.t2s(norm_teacher_hiddens + norm_tea_target).float()
        align = q.matmul(norm_tea_index.float().transpose(-1, -2)) / math.sqrt(2 * teacher_hiddens.shape[-1])
        align_mask = pad_mask.float().unsqueeze(-1) * teacher_pad_mask.float().unsqueeze(1)
        align = align + (1.0 - align_mask) * (-100000)
        t2s_logits = torch.softmax(align, -1).matmul(v_t).matmul(wrapper.student.lm_head.weight.T)
        lprobs = torch.log_softmax(t2s_logits, -1)
        ce_sum = -(lprobs.gather(-1, formal_target.unsqueeze(-1)).squeeze(-1) * pad_mask).sum()
        acc = t2s_logits.argmax(-1).eq(target)
        options = {k: v for k, v in config.options.items()}
        per_position = divergence(config.divergence, logits, t2s_logits, config.temperature, **options)
        t2s_kd = (per_position * pad_mask * acc).sum()
        s2t_logits = torch.softmax(align.transpose(-1, -2), -1).matmul(v_s).matmul(teacher.lm_head.weight.T)
        s2t_kd = (divergence("fkl", s2t_logits, teacher_logits, config.temperature) * teacher_pad_mask).sum()
    n = pad_mask.sum()
    return t2s_kd / n, s2t_kd / n, ce_sum / n


def test_cma_terms_match_the_official_code_by_default(cma_wrapper, cross_teacher, dual_batches):
    """The defaults (cma_std batch, cma_teacher_kl per_student_token) give the repository's terms, at their
    scale: the teacher-space KL summed over the teacher's tokens and divided by the student's."""
    config = DSKDConfig(divergence="rkl", temperature=1.3)
    batch = dual_batches[2]
    terms = dskd_cma_terms(cma_wrapper, cross_teacher, batch, config)
    kd_student, kd_teacher, ce_t2s = _cma_official(cma_wrapper, cross_teacher, batch, config)
    assert terms.tokens != terms.teacher_tokens  # two tokenizations: the normalisation matters
    assert terms.kd_student.item() == pytest.approx(kd_student.item(), rel=1e-4)
    assert terms.kd_teacher.item() == pytest.approx(kd_teacher.item(), rel=1e-4)
    assert terms.ce_t2s.item() == pytest.approx(ce_t2s.item(), rel=1e-4)
    assert terms.kd_student.item() > 1e-4 and terms.kd_teacher.item() > 1e-3
    per_teacher = dskd_cma_terms(
        cma_wrapper, cross_teacher, batch, config.model_copy(update={"cma_teacher_kl": "per_teacher_token"})
    )
    ratio = terms.teacher_tokens.item() / terms.tokens.item()
    assert terms.kd_teacher.item() == pytest.approx(per_teacher.kd_teacher.item() * ratio, rel=1e-5)


def test_padded_head_rows_are_trimmed(plain_wrapper, cma_wrapper, teacher, cross_teacher, tokenizers):
    """A teacher head with extra rows (huge logits) gives the same loss once vocab_size trims them."""
    student_tok, teacher_tok = tokenizers

    def padded(model, n_ids):
        model = copy.deepcopy(model)
        model.resize_token_embeddings(n_ids + 8)
        with torch.no_grad():
            model.get_output_embeddings().weight[n_ids:] = 3.0
        return model

    s_examples, t_examples = encode_dual(student_tok, teacher_tok, PROMPTS[:6], RESPONSES[:6], MAX_LENGTH)
    batch = collate(s_examples, _pad(student_tok))
    dual = collate_dual(s_examples, t_examples, _pad(student_tok), _pad(teacher_tok))
    big_teacher, big_cross = padded(teacher, len(student_tok)), padded(cross_teacher, len(teacher_tok))
    with torch.no_grad():
        expected = dskd_loss(plain_wrapper, teacher, batch, DSKDConfig())[1]
        trimmed = dskd_loss(plain_wrapper, big_teacher, batch, DSKDConfig(), vocab_size=len(student_tok))[1]
        untrimmed = dskd_cma_loss(cma_wrapper, big_cross, dual, DSKDConfig())[1]
        expected_cma = dskd_cma_loss(cma_wrapper, cross_teacher, dual, DSKDConfig())[1]
        trimmed_cma = dskd_cma_loss(
            cma_wrapper, big_cross, dual, DSKDConfig(), teacher_vocab_size=len(teacher_tok)
        )[1]
    assert trimmed == pytest.approx(expected, rel=1e-5)
    assert trimmed_cma == pytest.approx(expected_cma, rel=1e-5)
    assert untrimmed["kd_teacher"] > expected_cma["kd_teacher"] + 0.1  # the padding rows would matter
    with pytest.raises(ValueError, match="pass vocab_size"):
        dskd_loss(plain_wrapper, big_teacher, batch, DSKDConfig())
    with pytest.raises(ValueError, match="teacher_vocab_size"):
        dskd_cma_loss(cma_wrapper, cross_teacher, dual, DSKDConfig(), teacher_vocab_size=10_000)


# -- data ---------------------------------------------------------------------------------------------------
def test_encode_dual_and_collate_dual(tokenizers):
    student_tok, teacher_tok = tokenizers
    s, t = encode_dual(student_tok, teacher_tok, PROMPTS[:3], RESPONSES[:3], MAX_LENGTH)
    batch = collate_dual(s, t, _pad(student_tok), _pad(teacher_tok))
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "labels",
        "teacher_input_ids",
        "teacher_attention_mask",
        "teacher_labels",
    }
    assert [e.input_ids for e in s] != [e.input_ids for e in t]  # really two tokenizations
    for row in range(3):
        for prefix, tok in (("", student_tok), ("teacher_", teacher_tok)):
            labels = batch[prefix + "labels"][row]
            response = tok.decode(labels[labels != IGNORE_INDEX].tolist(), skip_special_tokens=True)
            assert response == RESPONSES[row]
    with pytest.raises(ValueError, match="2 student examples but 3 teacher examples"):
        collate_dual(s[:2], t, _pad(student_tok), _pad(teacher_tok))


def test_wrong_batch_or_wrapper_is_refused(plain_wrapper, cma_wrapper, cross_teacher, batches):
    with pytest.raises(KeyError, match="teacher_input_ids"):
        dskd_cma_loss(cma_wrapper, cross_teacher, batches[0], DSKDConfig())
    with pytest.raises(ValueError, match="cross_attention=True"):
        dskd_cma_loss(plain_wrapper, cross_teacher, batches[0], DSKDConfig())


# -- projector pre-training ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cross", [False, True])
def test_projector_pretraining_trains_projectors_only(
    student, teacher, cross_teacher, batches, dual_batches, cross
):
    wrapper = _wrapper(student, cross)
    the_teacher, data = (cross_teacher, dual_batches) if cross else (teacher, batches)
    terms_fn = dskd_cma_terms if cross else dskd_terms
    loss, metrics = projector_pretraining_loss(wrapper, the_teacher, data[0])
    assert set(metrics) == {"loss", "ce_t2s", "t2s_accuracy", "tokens"}
    assert loss.item() == pytest.approx(terms_fn(wrapper, the_teacher, data[0], DSKDConfig()).ce_t2s.item())
    loss.backward()
    assert all(p.grad is None for p in wrapper.student.parameters())
    assert all(p.grad is None for p in the_teacher.parameters())
    assert wrapper.t2s.weight.grad is not None and wrapper.s2t.weight.grad is None
    assert (wrapper.query.weight.grad is not None) if cross else wrapper.query is None
    before = metrics["ce_t2s"]
    _pretrain(wrapper, the_teacher, data, steps=15)
    assert projector_pretraining_loss(wrapper, the_teacher, data[0])[1]["ce_t2s"] < before - 0.5


# -- training -----------------------------------------------------------------------------------------------
def _first_last(history, key):
    values = [m[key] for m in history]
    return sum(values[:5]) / 5, sum(values[-5:]) / 5


@pytest.mark.parametrize("cross", [False, True])
def test_dskd_trains_and_the_student_generates(
    plain_wrapper, cma_wrapper, teacher, cross_teacher, batches, dual_batches, tokenizers, cross
):
    wrapper = copy.deepcopy(cma_wrapper if cross else plain_wrapper)  # projectors pre-trained
    the_teacher, data = (cross_teacher, dual_batches) if cross else (teacher, batches)
    loss_fn = dskd_cma_loss if cross else dskd_loss
    config = DSKDConfig()
    optimizer = torch.optim.AdamW(wrapper.parameter_groups(student_lr=5e-3, projector_lr=config.projector_lr))
    history = []
    for step in range(35):
        loss, metrics = loss_fn(wrapper, the_teacher, data[step % len(data)], config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(metrics)
    for key in ("loss", "kd_student", "kd_teacher", "ce"):
        first, last = _first_last(history, key)
        assert last < 0.9 * first, (key, first, last)

    assert type(wrapper.student) is Qwen2ForCausalLM
    generations = generate(
        wrapper.student, tokenizers[0], PROMPTS[:3], SamplingConfig(max_new_tokens=5, show_progress=False)
    )
    assert len(generations) == 3 and all(g.token_ids for g in generations)


def test_training_run_trains_student_and_projectors_together(plain_wrapper, teacher, tokenizers):
    """TrainingRun with the wrapper as `model`: one optimizer moves the student and the projectors."""
    wrapper = copy.deepcopy(plain_wrapper)
    before = copy.deepcopy(wrapper.state_dict())
    examples, _ = encode_pairs(tokenizers[0], PROMPTS, RESPONSES, MAX_LENGTH)
    data = ShuffledBatches(examples, 8, lambda chosen: collate(chosen, _pad(tokenizers[0])), seed=0)
    config = TrainingConfig(
        max_steps=2, batch_size=8, learning_rate=1e-3, device="cpu", show_progress=False, log_every=1
    )
    result = TrainingRun(
        wrapper, lambda model, batch: dskd_loss(model, teacher, batch, DSKDConfig()), data, config
    ).run()
    after = result.model.state_dict()
    for name in (
        "t2s.weight",
        "s2t.weight",
        "student.lm_head.weight",
        "student.model.layers.0.mlp.up_proj.weight",
    ):
        assert not torch.equal(before[name], after[name]), name
    assert {"kd_student", "kd_teacher", "ce_t2s"} <= set(result.history[-1])
