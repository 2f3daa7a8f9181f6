"""A student cut from its teacher (`keep_layers`): the kept weights are the teacher's, the forward pass is
the teacher's through those layers, and a bad list is refused naming the parameter."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tests.helpers import MATH_CORPUS, bpe_tokenizer
from warmup_distill_kedro.core.errors import UserInputError
from warmup_distill_kedro.core.models.layers import keep_layers, resolve_keep_layers
from warmup_distill_kedro.core.models.modeling import Checkpoint

LAYERS = 6
SIZES = dict(
    hidden_size=16,
    intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=LAYERS,
)


def _teacher(kind: str) -> Checkpoint:
    tokenizer = bpe_tokenizer(MATH_CORPUS)
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, **SIZES))
    else:  # qwen2, with a sliding-window layer among full-attention ones: per-layer settings must follow
        config = Qwen2Config(vocab_size=len(tokenizer), use_sliding_window=True, sliding_window=4, **SIZES)
        config.layer_types = ["full_attention", "sliding_attention"] * (LAYERS // 2)
        model = Qwen2ForCausalLM(config)
    return Checkpoint(model=model.eval(), tokenizer=tokenizer, metadata={"catalog_version": "v1"})


def _manual_forward(model, input_ids: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """The teacher's logits when only `kept` of its decoder layers run, in order."""
    inner = model.model
    hidden = inner.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
    rotary = inner.rotary_emb(hidden, positions)
    causal = torch.full((input_ids.shape[1],) * 2, float("-inf")).triu(1)[None, None]
    for index in kept:
        layer = inner.layers[index]
        window = getattr(layer.self_attn, "sliding_window", None)
        mask = causal
        if window:  # a sliding layer sees only the last `window` positions
            far = torch.ones_like(causal, dtype=torch.bool).tril(-window)
            mask = causal.masked_fill(far, float("-inf"))
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return model.lm_head(inner.norm(hidden))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_kept_layers_are_the_teachers_and_compute_the_same(kind):
    teacher = _teacher(kind)
    kept = [0, 3, 5]
    student = keep_layers(teacher, kept)

    assert student.model.config.num_hidden_layers == 3
    assert student.metadata["keep_layers"] == kept
    assert student.tokenizer is teacher.tokenizer
    for new, old in enumerate(kept):
        for (name, weight), (_, original) in zip(
            student.model.model.layers[new].state_dict().items(),
            teacher.model.model.layers[old].state_dict().items(),
            strict=True,
        ):
            assert torch.equal(weight, original), f"layer {new} ({old}) {name}"
    assert torch.equal(student.model.lm_head.weight, teacher.model.lm_head.weight)
    assert torch.equal(student.model.model.embed_tokens.weight, teacher.model.model.embed_tokens.weight)
    if kind == "qwen2":
        assert student.model.config.layer_types == [
            "full_attention",
            "sliding_attention",
            "sliding_attention",
        ]

    input_ids = torch.randint(0, len(teacher.tokenizer), (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = student.model(input_ids=input_ids).logits
        expected = _manual_forward(teacher.model, input_ids, kept)
        all_layers = teacher.model(input_ids=input_ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, all_layers, atol=1e-3)  # the dropped layers mattered


def test_a_cut_student_does_not_share_tensors_with_its_teacher():
    teacher = _teacher("llama")
    student = keep_layers(teacher, 2)
    with torch.no_grad():
        student.model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    assert not torch.equal(
        student.model.model.layers[0].mlp.up_proj.weight, teacher.model.model.layers[0].mlp.up_proj.weight
    )


@pytest.mark.parametrize(
    ("count", "layers", "expected"),
    [(6, 30, [0, 6, 12, 17, 23, 29]), (2, 30, [0, 29]), (3, 5, [0, 2, 4]), (4, 4, [0, 1, 2, 3])],
)
def test_a_number_keeps_evenly_spaced_layers_with_the_first_and_the_last(count, layers, expected):
    assert resolve_keep_layers(count, layers, "p") == expected


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        ([], "is empty"),
        ([0, 6], r"\[6\] out of range; the model has layers 0 to 5"),
        ([-1, 2], r"\[-1\] out of range"),
        ([1, 1, 3], r"layers \[1\] are listed more than once"),
        ([3, 1], "increasing order"),
        (7, "7 layers cannot be kept evenly from a model of 6 layers"),
        (1, "give 2 to 6"),
        ("all", "give a number of layers or a list"),
    ],
)
def test_a_bad_keep_layers_is_refused_naming_the_parameter(keep, message):
    with pytest.raises(UserInputError, match=r"^checkpoints\.student\.keep_layers: .*" + message):
        keep_layers(_teacher("llama"), keep, parameter="checkpoints.student.keep_layers")
