"""What several test files share, in one place.

- the project copied into a folder, and a versioned dataset's version folders (end-to-end runs);
- tiny model sizes, corpora, tokenizers and checkpoints;
- the examples of the pipeline tests and a pipeline run on an in-memory catalog;
- the training loop's toy model and data (tests/core/training, tests/hooks/test_processes.py);
- a model that writes scripted answers (`answering_model`: evaluation on known, non-zero scores);
- a Kedro run without a session, with hooks (tests/hooks);
- evaluation JSONs in the producers' contract and a row of the report's table (tests/reporting, the report
  pipeline, tests/test_compare.py);
- what a save puts on disk, and when (`DiskEvents`: the durable saves of tests/datasets and the loop).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import kedro
import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from kedro.config import OmegaConfigLoader
from kedro.framework.context import KedroContext
from kedro.framework.hooks import hook_impl
from kedro.framework.hooks.manager import _create_hook_manager
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline
from kedro.runner import SequentialRunner
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from warmup_distill_kedro.core.evaluation.explain import RECORD_COLUMNS, changes, group_means
from warmup_distill_kedro.core.models.modeling import Checkpoint, ModelSize, build_model
from warmup_distill_kedro.core.models.tokenization import (
    TokenizerConfig,
    eos_and_pad_ids,
    train_bpe_tokenizer,
)
from warmup_distill_kedro.core.tasks import InstructionTaskConfig, MathTaskConfig, SplitConfig
from warmup_distill_kedro.core.tasks.sources import generate_examples, three_splits
from warmup_distill_kedro.core.training.config import TrainingConfig
from warmup_distill_kedro.settings import CONFIG_LOADER_ARGS
from warmup_distill_kedro.tracking import log_step_metrics

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def version_folders(folder: Path) -> list[Path]:
    """The version folders of a versioned dataset, oldest first (hidden temporaries left out)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


# Where `--env test` runs write (conf/test/globals.yml: data_root), apart from the demo's data/.
TEST_DATA = "data/test"


def make_project_copy(folder: Path) -> Path:
    """The project's conf/ (without conf/local) and pyproject.toml in `folder`: a project to run."""
    shutil.copytree(PROJECT_ROOT / "conf", folder / "conf", ignore=shutil.ignore_patterns("local"))
    (folder / "conf" / "local").mkdir()
    shutil.copy(PROJECT_ROOT / "pyproject.toml", folder / "pyproject.toml")
    (folder / "src").mkdir()  # Kedro checks that it exists; the package itself is installed
    (folder / "data").mkdir()
    return folder


# -- tiny models, corpora, tokenizers ---------------------------------------------------------------------
TINY = ModelSize(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
SMALL = ModelSize(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
# Untied: with tied embeddings a random tiny model greedily repeats one token, which hides position errors.
# The size the generation tests share (sampling, checking, sharded generation, the vllm backend).
SMALL_UNTIED = SMALL.model_copy(update={"tie_word_embeddings": False})

# Arithmetic and plain text, digits and accents: the corpus of the encoding, sampling and preference tests.
MIXED_CORPUS = [
    "Question: what is 12 plus 345?\nAnswer: 357 #### 357",
    "The cat sat on the mat. Héllo wörld!",
] * 10
# Two word problems in the math task's format: the corpus of the check and sharded generation tests.
MATH_CORPUS = [
    "Question: Tom has 12 apples and buys 5 more. How many now?\nAnswer: 12 + 5 = 17. #### 17",
    "Question: Mia has 9 pens and gives away 4. How many now?\nAnswer: 9 - 4 = 5. #### 5",
] * 20


def bpe_tokenizer(corpus: Sequence[str], vocab_size: int = 300, **config: Any) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained on `corpus`."""
    return train_bpe_tokenizer(list(corpus), TokenizerConfig(vocab_size=vocab_size, **config))


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The ids of `text` alone (no special tokens)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tiny_checkpoint(
    tokenizer: PreTrainedTokenizerBase,
    size: ModelSize = TINY,
    seed: int = 0,
    metadata: dict[str, Any] | None = None,
) -> Checkpoint:
    """A randomly initialised model of `size` for `tokenizer`, as a checkpoint."""
    return Checkpoint(build_model(size, tokenizer, seed=seed), tokenizer, dict(metadata or {}))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def assert_weights_close(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-6) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.allclose(sa[name], sb[name], atol=atol), name


# -- the pipeline tests: examples, and a run on an in-memory catalog ------------------------------------------
def tiny_splits(
    math_examples: int = 60, instruction_examples: int = 20, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Train / validation / test of both embedded tasks, small numbers and short lists (short sequences)."""
    examples = generate_examples(
        MathTaskConfig(n_examples=math_examples, seed=seed, max_number=9, max_steps=2),
        InstructionTaskConfig(n_examples=instruction_examples, seed=seed + 1, max_list_length=3),
    )
    return three_splits(examples, SplitConfig(validation_fraction=0.2, test_fraction=0.2, seed=seed))


class _NodeOutputs:
    """Every output of every node of a run, as the node returned it (the runner releases the ones later
    nodes have consumed)."""

    def __init__(self) -> None:
        self.outputs: dict[str, Any] = {}

    @hook_impl
    def after_node_run(self, outputs: dict[str, Any]) -> None:
        self.outputs.update(outputs)


def _memory_catalog(data: Mapping[str, Any]) -> DataCatalog:
    """A catalog of `MemoryDataset`s; checkpoints are handed over as they are (`copy_mode="assign"`), not
    deep-copied at every load."""
    return DataCatalog(
        {
            name: MemoryDataset(value, copy_mode="assign" if isinstance(value, Checkpoint) else None)
            for name, value in data.items()
        }
    )


def run_pipeline(pipeline: Pipeline, data: Mapping[str, Any]) -> dict[str, Any]:
    """Run `pipeline` with Kedro's SequentialRunner on an in-memory catalog holding `data` (its inputs,
    parameters as `params:<name>`); returns what every node returned, by dataset name."""
    missing = pipeline.inputs() - set(data)
    assert not missing, f"the test gives no {sorted(missing)}"
    catalog = _memory_catalog(data)
    for name in pipeline.all_outputs() - set(data):  # outputs too: produced checkpoints are not deep-copied
        catalog[name] = MemoryDataset(copy_mode="assign")
    recorder = _NodeOutputs()
    hook_manager = _create_hook_manager()
    hook_manager.register(recorder)
    SequentialRunner().run(pipeline, catalog, hook_manager)
    return recorder.outputs


# -- the training loop's toy model and data ----------------------------------------------------------------
# The loop's tests use neither the tokenizers nor the encoding module: equal-length random sequences and a
# loss of their own, so that they test the loop alone (IGNORE_INDEX is the value core.models.encoding uses).
IGNORE_INDEX = -100
VOCAB = 300
SEQ_LEN = 10
PROMPT_LEN = 4


def toy_model(seed: int = 0) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def toy_examples(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Equal-length sequences with the first PROMPT_LEN positions ignored: every batch has the same token count."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, SEQ_LEN), generator=generator)
    return [{"input_ids": row.tolist()} for row in ids]


def toy_collate(examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor([e["input_ids"] for e in examples])
    labels = input_ids.clone()
    labels[:, :PROMPT_LEN] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}


def toy_lm_loss(model, batch):
    """Token-mean NLL of the labelled positions (the SFT loss, kept apart from core.models.encoding)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
    )
    return loss, {"nll": loss.item(), "tokens": float((targets != IGNORE_INDEX).sum())}


def uneven_examples(n: int) -> list[dict[str, list[int]]]:
    """Sequences whose response lengths differ (1 to 6 labelled tokens), so that micro-batches of one step
    hold different numbers of tokens."""
    generator = torch.Generator().manual_seed(3)
    examples = []
    for i in range(n):
        length = PROMPT_LEN + 2 + i % 6
        examples.append({"input_ids": torch.randint(2, VOCAB, (length,), generator=generator).tolist()})
    return examples


def uneven_collate(examples):
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.ones(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, PROMPT_LEN:n] = input_ids[row, PROMPT_LEN:n]
        mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


class AnsweringModel(Qwen2ForCausalLM):
    """Writes, greedily, the scripted response of each prompt it knows, then an EOS (an EOS at once after
    any other prompt): every logit 0 but the next scripted token's. Without a KV cache, so that each
    forward sees the whole sequence (left padding masked out) and knows how much it has written."""

    def __init__(self, config: Qwen2Config, responses: Mapping[tuple[int, ...], list[int]], eos_id: int):
        super().__init__(config)
        self.responses, self.eos_id = dict(responses), eos_id
        self.generation_config.use_cache = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any):
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size)
        for row, ids in enumerate(input_ids.tolist()):
            if attention_mask is not None:
                ids = [i for i, keep in zip(ids, attention_mask[row].tolist(), strict=True) if keep]
            following = self.eos_id
            for prompt, response in self.responses.items():
                if tuple(ids[: len(prompt)]) == prompt and len(ids) - len(prompt) < len(response):
                    following = response[len(ids) - len(prompt)]
            logits[row, -1, following] = 10.0
        return CausalLMOutputWithPast(logits=logits)


def answering_model(tokenizer: PreTrainedTokenizerBase, responses: Mapping[str, str]) -> AnsweringModel:
    """An `AnsweringModel` for `tokenizer`: `responses` maps a prompt text to the text written after it."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    config = build_model(TINY, tokenizer, seed=0).config
    eos_id, _ = eos_and_pad_ids(tokenizer)
    return AnsweringModel(config, {tuple(ids(p)): ids(r) for p, r in responses.items()}, eos_id).eval()


def training_config(**overrides: Any) -> TrainingConfig:
    """Training settings for a test: on the CPU, no progress bar, seed 0, logged every step."""
    values = dict(
        max_steps=4,
        batch_size=4,
        learning_rate=1e-2,
        warmup_steps=0,
        log_every=1,
        device="cpu",
        show_progress=False,
        seed=0,
    )
    return TrainingConfig(**{**values, **overrides})


# -- a Kedro run without a session (the hooks' tests) --------------------------------------------------------
HOOK_PARAMS = {
    "training": {"lr": 0.01, "schedule": {"warmup": 2, "steps": 3}, "layers": [4, 8]},
    "prep": {"seed": 1},
}
RAW_VERSIONS = ("2020-01-01T00.00.00.000Z", "2021-06-01T00.00.00.000Z")
HOOK_CATALOG = {
    "raw": {"type": "pandas.CSVDataset", "filepath": "data/raw.csv", "versioned": True},
    "model_table": {"type": "pandas.CSVDataset", "filepath": "data/model_table.csv", "versioned": True},
}
TRAIN_TAGS = ["training", "student", "variant.kd", "objective.fkl"]


def write_raw(project_path: Path, x: Sequence[float], versions: Sequence[str] = RAW_VERSIONS[:1]) -> None:
    """The versioned `raw` table of HOOK_CATALOG (one column `x`), in each of `versions`."""
    for version in versions:
        folder = project_path / "data" / "raw.csv" / version
        folder.mkdir(parents=True)
        pd.DataFrame({"x": list(x)}).to_csv(folder / "raw.csv", index=False)


def make_context(project_path: Path, conf_dir: Path, mlflow_conf: dict | None, hook_manager) -> KedroContext:
    """A real KedroContext (OmegaConfigLoader with the project's config patterns) on a throwaway conf/:
    HOOK_PARAMS, HOOK_CATALOG and, unless None, `mlflow_conf` as its mlflow.yml."""
    (conf_dir / "base").mkdir(parents=True)
    (conf_dir / "local").mkdir()
    if mlflow_conf is not None:
        (conf_dir / "base" / "mlflow.yml").write_text(yaml.safe_dump({"mlflow": mlflow_conf}))
    (conf_dir / "base" / "parameters.yml").write_text(yaml.safe_dump(HOOK_PARAMS))
    (conf_dir / "base" / "catalog.yml").write_text(yaml.safe_dump(HOOK_CATALOG))
    loader = OmegaConfigLoader(conf_source=str(conf_dir), env=None, **CONFIG_LOADER_ARGS)
    context = KedroContext(
        project_path=project_path,
        config_loader=loader,
        env=None,
        package_name="warmup_distill_kedro",
        hook_manager=hook_manager,
    )
    context._pipelines_to_validate = []  # KedroSession.run scopes parameter validation to the pipelines run
    return context


def kedro_run(hook_manager, context: KedroContext, pipeline: Pipeline, names=("demo",), session_id="s-1"):
    """What ``KedroSession.run`` does around the runner (kedro/framework/session/session.py, 1.7.0)."""
    runner = SequentialRunner()
    catalog = context.catalog
    run_params = {
        "run_id": session_id,
        "project_path": context.project_path.as_posix(),
        "env": context.env,
        "kedro_version": kedro.__version__,
        "pipeline_names": list(names),
        "runner": getattr(runner, "__name__", str(runner)),
    }
    hook_manager.hook.before_pipeline_run(run_params=run_params, pipeline=pipeline, catalog=catalog)
    try:
        result = runner.run(pipeline, catalog, hook_manager, run_id=session_id)
    except Exception as error:
        hook_manager.hook.on_pipeline_error(
            error=error, run_params=run_params, pipeline=pipeline, catalog=catalog
        )
        raise
    hook_manager.hook.after_pipeline_run(
        run_params=run_params, run_result=result, pipeline=pipeline, catalog=catalog
    )
    return result


# What the last `train` call saw: its thread and the MLflow run active in it.
SEEN: dict = {}


def train(raw: pd.DataFrame, training: dict) -> tuple[pd.DataFrame, dict]:
    """A training node: step metrics from inside the node, a table and final metrics out."""
    SEEN["thread"] = threading.get_ident()
    active = mlflow.active_run()
    SEEN["active_run"] = active.info.run_id if active else None
    for step in range(3):
        log_step_metrics({"loss": np.float32(1.0 / (step + 1)), "lr": training["lr"]}, step=step)
    metrics = {"final_loss": 0.25, "steps": 3, "note": "not a number", "eval": {"acc": 0.5}}
    return raw.assign(w=raw["x"] * training["lr"]), metrics


# -- the explain pipeline's records and tables ------------------------------------------------------------------
def explain_records(
    subject: str, kl: Sequence[float], nll: Sequence[float], classes: Sequence[str], tasks: Sequence[str]
) -> pd.DataFrame:
    """Token records of `subject` (`<variant>.<objective>`) in core.evaluation.explain's columns, one per
    value, at positions 0, 1, ...: a quarter of each KL on the teacher's top token, the rest on the rest."""
    n = len(kl)
    variant, objective = subject.split(".")[:2] if "." in subject else (subject, subject)
    return pd.DataFrame(
        {
            "subject": subject, "variant": variant, "objective": objective,
            "example_id": "e", "task": list(tasks), "position": list(range(n)), "token_id": 0, "token": "",
            "token_class": list(classes), "nll": list(nll), "student_top_is_gold": pd.array([True] * n, "boolean"),
            "teacher_entropy": 1.0, "teacher_top_is_gold": pd.array([False] * n, "boolean"),
            "teacher_top_prob": 0.5, "kl": list(kl), "kl_top": [v / 4 for v in kl],
            "kl_rest": [3 * v / 4 for v in kl],
        }
    )[RECORD_COLUMNS]  # fmt: skip


EXPLAIN_CLASSES = ["digit", "digit", "operator", "word", "eos"]
EXPLAIN_TASKS = ["math", "math", "math", "instruction", "instruction"]


def uniform_explain_records(subject: str, kl: float) -> pd.DataFrame:
    """Records of a subject whose every token has the KL `kl` (NLL twice that; NaN: no KL, another
    tokenizer)."""
    return explain_records(
        subject, [kl] * 5, [2 * kl if kl == kl else 1.0] * 5, EXPLAIN_CLASSES, EXPLAIN_TASKS
    )


def explain_changes_table(kl: Mapping[str, float], pairs: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """The report's `explain_changes` for subjects whose every token has the KL `kl[subject]`, compared
    as (before, after) `pairs`."""
    records = [uniform_explain_records(subject, value) for subject, value in kl.items()]
    return changes(group_means(records), pairs)


# -- evaluation JSONs and the report's table -----------------------------------------------------------------
EDGES = [i / 20 for i in range(21)]
# The grid of the report's tests (tests/reporting/conftest.py).
REPORT_VARIANTS = ["vanilla", "warmup"]
REPORT_OBJECTIVES = ["fkl", "rkl", "akl"]


def evaluation(
    subject: str,
    variant: str,
    objective: str,
    exact_match: float | None = 0.4,
    rouge: Sequence[float] | None = (0.50, 0.51, 0.52),
    kl: float | None = 0.1,
    rejected: float | None = 0.07,
    counts: Sequence[int] | None = None,
) -> dict[str, Any]:
    """One evaluation JSON; None for a benchmark or statistic means it was not measured."""
    return {
        "subject": subject,
        "variant": variant,
        "objective": objective,
        "math": None if exact_match is None else {"exact_match": exact_match, "n_examples": 500},
        "instruction": None
        if rouge is None
        else {
            "rouge_l": sum(rouge) / len(rouge),
            "rouge_l_std": 0.01,
            "rouge_l_per_seed": {str(seed): value for seed, value in enumerate(rouge)},
            "n_seeds": len(rouge),
            "n_examples": 100,
        },
        "distribution": {
            "heldout_nll": 0.2,
            "heldout_kl": kl,
            "heldout_entropy": 0.3,
            "teacher_heldout_entropy": 0.25,
            "rejected_share": rejected,
            "n_sampled_tokens": 9000,
            "teacher_prob_histogram": None if counts is None else {"edges": EDGES, "counts": list(counts)},
        },
    }


def row(table: pd.DataFrame, objective: str, variant: str, benchmark: str, metric: str) -> pd.Series:
    """The one row of a report table for (objective, variant, benchmark, metric)."""
    match = table[
        (table["objective"] == objective)
        & (table["variant"] == variant)
        & (table["benchmark"] == benchmark)
        & (table["metric"] == metric)
    ]
    assert len(match) == 1, (objective, variant, benchmark, metric)
    return match.iloc[0]


def markdown_rows(markdown: str, first_cell: str) -> list[list[str]]:
    """The cells of every Markdown table line whose first cell is ``first_cell``."""
    rows = []
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


# -- what a save puts on disk ---------------------------------------------------------------------------------
class DiskEvents:
    """Records, in order, every `os.fsync` (by the path its descriptor names) and every rename (os.rename,
    os.replace; fsspec's local `mv` goes through them) while the test runs."""

    def __init__(self, monkeypatch: Any) -> None:
        self.events: list[tuple[str, ...]] = []
        fsync = os.fsync

        def recording_fsync(fd: int) -> None:
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            fsync(fd)

        monkeypatch.setattr(os, "fsync", recording_fsync)
        for name in ("rename", "replace"):
            monkeypatch.setattr(os, name, self._recording(getattr(os, name)))

    def _recording(self, rename: Any) -> Any:
        def recording_rename(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
            self.events.append(("rename", os.fspath(source), os.fspath(target)))
            rename(source, target, *args, **kwargs)

        return recording_rename

    def the_rename(self) -> tuple[str, str, int]:
        """(source, target, position in the events) of the one rename recorded."""
        [(position, (_, source, target))] = [(i, e) for i, e in enumerate(self.events) if e[0] == "rename"]
        return source, target, position

    def synced(self, path: str | os.PathLike[str], before: int | None = None, after: int = -1) -> bool:
        """Whether `path` was fsynced between two positions in the events."""
        window = self.events[after + 1 : before]
        return ("fsync", os.fspath(path)) in window
