"""Benchmark 2: one distill step against its lower bound.

A distill step is a teacher forward (no grad) + a student forward/backward on (1 - kd_rate) CE + kd_rate KD
+ the optimizer step. It cannot be cheaper than a teacher forward plus one plain SFT step of the student
on the same tokens: `ratio = (teacher forward + student SFT step) / distill step` says how close to that
bound the KD loss gets (1.0: the KD term costs nothing; the issue's goal is at least 0.85).

    python benchmarks/distill_step.py                    # CPU preset: 1024 tokens, 32k vocabulary
    python benchmarks/distill_step.py --preset qwen2.5   # GPU: Qwen2.5-1.5B student, 7B teacher, 152k vocab
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, write_report  # noqa: E402

from warmup_distill_kedro.core.encoding import IGNORE_INDEX, causal_lm_loss  # noqa: E402
from warmup_distill_kedro.core.kd_losses import KDConfig, distillation_loss  # noqa: E402

# (hidden, layers, heads, kv heads, intermediate) of each model, vocabulary, batch, sequence length.
PRESETS = {
    "cpu": {
        "student": (256, 4, 4, 4, 704),
        "teacher": (512, 4, 8, 8, 1408),
        "vocab": 32000,
        "batch": 8,
        "length": 128,
    },
    "tiny": {  # the smoke test's: seconds, not a measurement
        "student": (32, 1, 2, 2, 64),
        "teacher": (64, 1, 2, 2, 128),
        "vocab": 512,
        "batch": 2,
        "length": 16,
    },
    "qwen2.5": {  # Qwen2.5-1.5B and Qwen2.5-7B configs, randomly initialised, 7B's padded vocabulary
        "student": (1536, 28, 12, 2, 8960),
        "teacher": (3584, 28, 28, 4, 18944),
        "vocab": 152064,
        "batch": 4,
        "length": 1024,
    },
}


def build(shape: tuple[int, int, int, int, int], vocab: int, dtype: torch.dtype, device: str, seed: int):
    hidden, layers, heads, kv_heads, intermediate = shape
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="KD loss chunk (positions); default: all"
    )
    parser.add_argument("--objective", default="fkl")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    student = build(preset["student"], preset["vocab"], dtype, device, seed=0)
    teacher = build(preset["teacher"], preset["vocab"], dtype, device, seed=1).eval().requires_grad_(False)
    if args.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    batch_size, length = preset["batch"], preset["length"]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, preset["vocab"], (batch_size, length), generator=generator)
    labels = input_ids.clone()
    labels[:, : length // 4] = IGNORE_INDEX  # the prompt quarter counts in neither loss
    batch = {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": labels.to(device),
    }
    kd = KDConfig(objective=args.objective, temperature=2.0, kd_rate=0.5, chunk_size=args.chunk_size)
    tokens = batch_size * length

    def teacher_forward():
        with torch.no_grad():
            return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def optimizer_step(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sft_step():
        loss, _ = causal_lm_loss(student, batch)
        optimizer_step(loss)

    def distill_step():
        teacher_logits = teacher_forward()
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = distillation_loss(student_logits, teacher_logits, batch["labels"], kd)
        optimizer_step(loss)

    timings = {
        "teacher_forward": median_seconds(teacher_forward, args.repeats),
        "student_sft_step": median_seconds(sft_step, args.repeats),
        "distill_step": median_seconds(distill_step, args.repeats),
    }
    bound = timings["teacher_forward"]["median_s"] + timings["student_sft_step"]["median_s"]
    distill = timings["distill_step"]["median_s"]
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    results = {
        "preset": args.preset,
        "config": {**preset, "objective": args.objective, "chunk_size": args.chunk_size, "dtype": str(dtype)},
        "gradient_checkpointing": args.gradient_checkpointing,
        "tokens_per_step": tokens,
        "timings": timings,
        "bound_s": bound,
        "distill_tokens_per_s": tokens / distill,
        "bound_tokens_per_s": tokens / bound,
        "ratio_to_bound": bound / distill,
        "peak_memory_bytes": peak,
    }
    rows = [
        f"| {name} | {t['median_s'] * 1000:.1f} ms | {t['min_s'] * 1000:.1f}-{t['max_s'] * 1000:.1f} | "
        f"{tokens / t['median_s']:,.0f} |"
        for name, t in timings.items()
    ]
    markdown = "\n".join(
        [
            f"Preset `{args.preset}`: {tokens} tokens per step ({batch_size} x {length}), vocabulary "
            f"{preset['vocab']:,}, {args.objective} at T 2, kd_rate 0.5, chunk {args.chunk_size}, {dtype}.",
            "",
            "| step | median | range (ms) | tokens/s |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
            f"Bound (teacher forward + student SFT step): {bound * 1000:.1f} ms; distill step / bound: "
            f"**ratio {bound / distill:.2f}** (goal >= 0.85)"
            + (f"; peak GPU memory {peak / 2**30:.1f} GiB." if peak else "."),
        ]
    )
    name = f"distill_step_{args.preset}" + (f"_{args.objective}" if args.objective != "fkl" else "")
    name += f"_chunk{args.chunk_size}" if args.chunk_size else ""
    json_path, _ = write_report(name, results, markdown)
    print(markdown)
    print(f"\nwrote {json_path}")


if __name__ == "__main__":
    main()
