"""core/kd/cache.py: the teacher's top-k cache. KD from it against float64 formulas on (k + 1)-point
distributions (the k ids plus one tail bucket), equal to the full-vocabulary loss at k = V; its refusals of
a stale cache; its round trip through shards on disk."""

from __future__ import annotations

import math

import pytest
import torch

from tests.core.kd.reference import CASE_IDS, CASES, reference_divergence, reference_of_distributions
from tests.helpers import SMALL, TINY, bpe_tokenizer, tiny_checkpoint
from warmup_distill_kedro.core.kd.cache import (
    CACHE_FORMAT,
    TeacherCacheConfig,
    build_teacher_topk,
    cache_teacher,
    cached_examples,
    check_cache,
    collate_cached,
    load_teacher_topk,
    save_teacher_topk,
    teacher_identity,
    topk_distillation_loss,
)
from warmup_distill_kedro.core.kd.losses import KDConfig, distillation_loss
from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX, encode_pairs

torch.set_num_threads(1)

PROMPTS = ["Question: what is 1 + 2 ?", "the cat", "sat on", "Question: 3 + 4 ?"]
RESPONSES = [" 3 #### 3", " sat on the mat", " the", " 7 #### 7"]
FINISHED = [True, False, True, True]
T = 1.7


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer([p + r for p, r in zip(PROMPTS, RESPONSES, strict=True)] * 10, vocab_size=280)


@pytest.fixture(scope="module")
def models(tokenizer):
    teacher = tiny_checkpoint(tokenizer, SMALL, seed=1, metadata={"catalog_version": "t1"})
    return teacher, tiny_checkpoint(tokenizer, TINY, seed=2)


@pytest.fixture(scope="module")
def encoded(tokenizer):
    return encode_pairs(tokenizer, PROMPTS, RESPONSES, 32, FINISHED)[0]


def _cache(models, encoded, tokenizer, k, dtype=torch.float32):
    teacher, _ = models
    return build_teacher_topk(
        teacher.model, encoded, tokenizer.pad_token_id, k, T, len(tokenizer), 3, teacher_identity(teacher),
        values_dtype=dtype, show_progress=False,
    )  # fmt: skip


def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _response_rows(batch, logits):
    targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    return logits[targets != IGNORE_INDEX]


@pytest.mark.parametrize(("objective", "opts"), CASES, ids=CASE_IDS)
def test_a_cache_of_the_whole_vocabulary_gives_the_full_loss_and_gradient(
    models, encoded, tokenizer, objective, opts
):
    teacher, student = models
    cache = _cache(models, encoded, tokenizer, len(tokenizer))
    batch = collate_cached(cached_examples(encoded, cache), tokenizer.pad_token_id)
    config = KDConfig(objective=objective, options=opts, temperature=T, kd_rate=1.0)
    logits = _logits(student.model, batch).detach().requires_grad_()
    loss, metrics = topk_distillation_loss(logits, batch, config, len(tokenizer))
    (grad,) = torch.autograd.grad(loss, logits)
    with torch.no_grad():
        teacher_logits = _logits(teacher.model, batch)
    expected = reference_divergence(
        objective, _response_rows(batch, logits.detach()), _response_rows(batch, teacher_logits), T, **opts
    ).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    full = logits.detach().requires_grad_()
    full_loss, _ = distillation_loss(full, teacher_logits, batch["labels"], config, len(tokenizer))
    (full_grad,) = torch.autograd.grad(full_loss, full)
    torch.testing.assert_close(grad, full_grad, rtol=1e-4, atol=1e-7)
    assert metrics["tokens"] == sum(int((torch.tensor(e.labels[1:]) != IGNORE_INDEX).sum()) for e in encoded)


@pytest.mark.parametrize(("objective", "opts"), CASES, ids=CASE_IDS)
def test_a_top_k_cache_compares_k_ids_plus_a_tail_bucket(models, encoded, tokenizer, objective, opts):
    """Against float64: p's top k and 1 - their sum, q at the same ids and 1 - their sum."""
    teacher, student = models
    k = 5
    cache = _cache(models, encoded, tokenizer, k)
    batch = collate_cached(cached_examples(encoded, cache), tokenizer.pad_token_id)
    config = KDConfig(objective=objective, options=opts, temperature=T, kd_rate=1.0)
    logits = _logits(student.model, batch).detach()
    loss, _ = topk_distillation_loss(logits, batch, config, len(tokenizer))
    with torch.no_grad():
        teacher_rows = _response_rows(batch, _logits(teacher.model, batch)).double()
    p_full = torch.softmax(teacher_rows / T, dim=-1)
    q_full = torch.softmax(_response_rows(batch, logits).double() / T, dim=-1)
    top = p_full.topk(k, dim=-1).indices
    p = torch.cat([p_full.gather(1, top), 1 - p_full.gather(1, top).sum(-1, keepdim=True)], dim=-1)
    q = torch.cat([q_full.gather(1, top), 1 - q_full.gather(1, top).sum(-1, keepdim=True)], dim=-1)
    expected = reference_of_distributions(objective, p, q, **opts).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    full = reference_divergence(objective, _response_rows(batch, logits), teacher_rows, T, **opts).mean()
    assert loss.item() != pytest.approx(full.item(), rel=1e-3)  # the bucket really merges the tail


def test_the_ce_term_and_the_student_sampled_switch(models, encoded, tokenizer):
    teacher, student = models
    cache = _cache(models, encoded, tokenizer, 8)
    batch = collate_cached(cached_examples(encoded, cache), tokenizer.pad_token_id)
    logits = _logits(student.model, batch).detach()
    config = KDConfig(objective="fkl", temperature=T, kd_rate=0.3)
    loss, metrics = topk_distillation_loss(logits, batch, config, len(tokenizer))
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )
    assert metrics["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.7 * metrics["ce"] + 0.3 * metrics["kd"], rel=1e-6)
    kd_only, _ = topk_distillation_loss(logits, batch, config, len(tokenizer), ce=False)
    assert kd_only.item() == pytest.approx(0.3 * metrics["kd"], rel=1e-6)


def test_the_cache_holds_what_its_metadata_says(models, encoded, tokenizer):
    cache = _cache(models, encoded, tokenizer, 6, dtype=torch.float16)
    positions = sum(int((torch.tensor(e.labels[1:]) != IGNORE_INDEX).sum()) for e in encoded)
    assert cache.ids.shape == (positions, 6) and cache.ids.dtype == torch.int32
    assert cache.logprobs.dtype == torch.float16 and cache.tail.dtype == torch.float32
    assert cache.bytes_per_token == 6 * (4 + 2) + 4 == cache.metadata["bytes_per_token"]
    assert (cache.logprobs[:, :-1] >= cache.logprobs[:, 1:]).all()  # most likely first
    mass = cache.logprobs.double().exp().sum(-1) + cache.tail.double().exp()
    torch.testing.assert_close(mass, torch.ones_like(mass), rtol=0, atol=5e-3)  # float16 values
    assert cache.metadata["format"] == CACHE_FORMAT and cache.metadata["temperature"] == T
    assert cache.metadata["teacher_version"] == "t1" and cache.metadata["top_k"] == 6
    with pytest.raises(ValueError, match=r"distill.teacher_cache.top_k must be in \[1, 280\]"):
        _cache(models, encoded, tokenizer, 281)


def test_a_stale_cache_is_refused_saying_what_differs(models, encoded, tokenizer):
    teacher, student = models
    cache = _cache(models, encoded, tokenizer, 6)
    check_cache(cache, teacher_identity(teacher), encoded, T)  # the cache's own teacher and examples
    other_teacher = tiny_checkpoint(tokenizer, SMALL, seed=7, metadata={"catalog_version": "t2"})
    with pytest.raises(
        ValueError, match=r"teacher teacher_version='t1', the run's is 't2'.*rebuild it: kedro run"
    ):
        check_cache(cache, teacher_identity(other_teacher), encoded, T)
    with pytest.raises(ValueError, match="other KD examples"):
        check_cache(cache, teacher_identity(teacher), encoded[:-1], T)
    with pytest.raises(ValueError, match=r"at temperature 1.7, distill.temperature is 2.0"):
        check_cache(cache, teacher_identity(teacher), encoded, 2.0)
    check_cache(cache, teacher_identity(teacher), encoded, T, top_k=6)
    with pytest.raises(ValueError, match=r"keeps the top 6 ids, distill.teacher_cache.top_k is 8"):
        check_cache(cache, teacher_identity(teacher), encoded, T, top_k=8)
    cache.metadata["format"] = 0
    with pytest.raises(ValueError, match=f"format 0, this code reads format {CACHE_FORMAT}"):
        check_cache(cache, teacher_identity(teacher), encoded, T)


def test_shards_on_disk_round_trip(models, encoded, tokenizer, tmp_path):
    cache = _cache(models, encoded, tokenizer, 6, dtype=torch.float16)
    save_teacher_topk(cache, tmp_path / "cache", shard_examples=3)  # 4 examples: two shards
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "shard_00000.safetensors", "shard_00001.safetensors", "teacher_topk.json",
    ]  # fmt: skip
    loaded = load_teacher_topk(tmp_path / "cache")
    for name in ("ids", "logprobs", "tail", "offsets"):
        assert torch.equal(getattr(loaded, name), getattr(cache, name)), name
    assert loaded.metadata == cache.metadata
    (tmp_path / "cache" / "teacher_topk.json").write_text('{"format": 0, "shards": []}')
    with pytest.raises(ValueError, match="format 0, this code reads format 1.*rebuild"):
        load_teacher_topk(tmp_path / "cache")


def test_cache_teacher_encodes_a_kd_table_as_the_cells_do(models, tokenizer):
    import pandas as pd

    teacher, _ = models
    table = pd.DataFrame(
        {"prompt": PROMPTS, "response": [r.lstrip() for r in RESPONSES], "finished": FINISHED}
    )
    cache = cache_teacher(teacher, table, TeacherCacheConfig(top_k=4, show_progress=False), T, 32, "error")
    from warmup_distill_kedro.core.models.encoding import encode_examples

    encoded, _ = encode_examples(tokenizer, table, 32)
    check_cache(cache, teacher_identity(teacher), encoded, T)
    assert cache.k == 4 and not math.isnan(cache.tail.sum().item())
