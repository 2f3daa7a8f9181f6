"""How far the KD loss read from the teacher's top-k cache is from the full-logit loss, on the same batches.

For each student (catalog names; the vanilla student before KD by default) and each objective, the KD term
alone (kd_rate 1, no CE) is computed on `--batches` training batches of the KD set two ways: against the
teacher's full logits (`distillation_loss`) and against its top-k plus tail (`build_teacher_topk` on the
same examples, then `topk_distillation_loss`, as a cell reading the cache does, float16 values). Printed per
(student, objective, k): the relative error of the KD value |cached - full| / full and of its gradient
w.r.t. the student's logits ||g_cached - g_full|| / ||g_full||, mean and max over the batches.

It runs in a project whose bootstrap outputs exist, from the project root, with the distill parameters
of conf/ (temperature, options, max_length):

    .venv/bin/python experiments/cache_error.py --objectives fkl js --top-k 8 32 128 --batches 8
    .venv/bin/python experiments/cache_error.py --students student_model vanilla.fkl.student
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from warmup_distill_kedro.core.kd.cache import (
    build_teacher_topk,
    cached_examples,
    collate_cached,
    topk_distillation_loss,
)
from warmup_distill_kedro.core.kd.cell import DistillConfig
from warmup_distill_kedro.core.kd.losses import distillation_loss
from warmup_distill_kedro.core.models.chat import table_prompt_format
from warmup_distill_kedro.core.models.encoding import collate, encode_examples
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids


def relative_errors(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batch_examples: list,
    pad_id: int,
    config: DistillConfig,
    objective: str,
    ks: list[int],
    vocab: int,
) -> dict[int, tuple[float, float]]:
    """{k: (value relative error, gradient relative error)} of the cached KD term against the full one."""
    kd = config.loss_config(objective).model_copy(update={"kd_rate": 1.0})
    batch = collate(batch_examples, pad_id)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full_logits = student_logits.clone().requires_grad_(True)
    full, _ = distillation_loss(full_logits, teacher_logits, batch["labels"], kd, vocab_size=vocab, ce=False)
    full.backward()
    errors = {}
    for k in ks:
        cache = build_teacher_topk(
            teacher, batch_examples, pad_id, k, kd.temperature, vocab, len(batch_examples), {}, show_progress=False
        )  # fmt: skip
        cached_batch = collate_cached(cached_examples(batch_examples, cache), pad_id)
        cached_logits = student_logits.clone().requires_grad_(True)
        cached, _ = topk_distillation_loss(cached_logits, cached_batch, kd, vocab, ce=False)
        cached.backward()
        value_error = abs(cached.item() - full.item()) / abs(full.item())
        grad_error = float((cached_logits.grad - full_logits.grad).norm() / full_logits.grad.norm())
        errors[k] = (value_error, grad_error)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", nargs="+", default=["student_model"])
    parser.add_argument("--objectives", nargs="+", default=["fkl", "js"])
    parser.add_argument("--top-k", nargs="+", type=int, default=[8, 32, 128])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="which training batches (a shuffle's seed)")
    args = parser.parse_args()
    project = Path.cwd()
    bootstrap_project(project)
    with KedroSession.create(project) as session:
        catalog = session.load_context().catalog
        config: DistillConfig = catalog.load("params:distill")  # DistillParams, validated by the hooks
        teacher = catalog.load("teacher_model")
        examples = catalog.load("kd_examples")
        students = {name: catalog.load(name) for name in args.students}
    torch.manual_seed(args.seed)
    prompt_format = table_prompt_format(examples)  # as the cells and the cache encode them
    encoded, _ = encode_examples(
        teacher.tokenizer, examples, config.max_length, config.prompt_overflow, prompt_format
    )
    _, pad_id = eos_and_pad_ids(teacher.tokenizer)
    vocab = len(teacher.tokenizer)
    order = random.Random(args.seed).sample(range(len(encoded)), len(encoded))
    size = config.training.batch_size
    batches = [[encoded[i] for i in order[b * size : (b + 1) * size]] for b in range(args.batches)]
    teacher.model.eval()
    print(f"{args.batches} batches of {size} KD examples, T {config.temperature}, vocabulary {vocab}")
    print("| student | objective | k | KD value rel. error, mean (max) | gradient rel. error, mean (max) |")
    print("|---|---|---:|---:|---:|")
    for name, student in students.items():
        student.model.eval()
        for objective in args.objectives:
            per_k: dict[int, list[tuple[float, float]]] = {k: [] for k in args.top_k}
            for batch in batches:
                errors = relative_errors(
                    student.model, teacher.model, batch, pad_id, config, objective, args.top_k, vocab
                )
                for k, pair in errors.items():
                    per_k[k].append(pair)
            for k, pairs in per_k.items():
                values, grads = [p[0] for p in pairs], [p[1] for p in pairs]
                print(
                    f"| {name} | {objective} | {k} | {statistics.mean(values):.2e} ({max(values):.2e}) "
                    f"| {statistics.mean(grads):.2e} ({max(grads):.2e}) |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
