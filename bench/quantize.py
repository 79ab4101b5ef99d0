"""Quantization on this machine: fp32 MiniLM against every CPU method, in one table.

Fine-tunes MiniLM on the chatterbot topics (bench/train.py's quality run: one process, lr 1.5e-4), then quantizes
it with every method available here, plus "linear-only" variants that keep the embedding tables in fp32, and
measures all of them on the validation split, interleaved, with the same threads: size on disk, p50 latency at
batch 1 and 16, throughput at batch 16, accuracy. Goal: an int8 method at >= 1.8x fp32 throughput, <= 30% of fp32
size and <= 1 point of accuracy lost.

    .venv/bin/python bench/quantize.py [--epochs 6] [--threads 2] [--repeats 30] [--work DIR]
        [--out bench/results/quantize.json]

``--work DIR`` keeps the dataset and the fine-tuned model there and reuses them on the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

GOAL_SPEEDUP, GOAL_SIZE, GOAL_DROP = 1.8, 0.30, 1.0


def fine_tune(work: Path, epochs: float, lr: float) -> tuple[Path, Path]:
    """The prepared dataset and the fine-tuned model, reused from ``work`` when an earlier run left them."""
    from train import prepare, spec_for, via_platform  # bench/train.py

    dataset = work / "dataset"
    if not (dataset / "manifest.json").is_file():
        prepare(dataset)
    marker = work / "model.json"
    if marker.is_file():
        return dataset, Path(json.loads(marker.read_text())["model_uri"])
    spec = spec_for(dataset, epochs=epochs, learning_rate=lr, distributed={"nproc_per_node": 1})
    quality = via_platform(work / "jobs", f"quality-{os.getpid()}", spec)
    marker.write_text(json.dumps({"model_uri": quality["model_uri"], "epochs": epochs, "learning_rate": lr}))
    return dataset, Path(quality["model_uri"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=6.0)
    parser.add_argument("--lr", type=float, default=1.5e-4)
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--repeats", type=int, default=30, help="timed batches per method and batch size")
    parser.add_argument("--max-eval-rows", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quantize.json")
    args = parser.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from airflow_llmops.ml.quantization import (
        FP32,
        available_methods,
        decide,
        format_table,
        load_fp32,
        load_quantized,
        measure_many,
        quantize_model,
        set_threads,
    )
    from airflow_llmops.ml.quantization.compare import eval_texts, relative_to_baseline
    from airflow_llmops.specs import QuantizationSpec

    work = args.work or Path(tempfile.mkdtemp(prefix="llmops-bench-quantize-"))
    work.mkdir(parents=True, exist_ok=True)
    dataset, model_dir = fine_tune(work, args.epochs, args.lr)
    threads = set_threads(args.threads)
    texts, labels = eval_texts(dataset, "validation", args.max_eval_rows)

    # (row name, method, quantize embeddings too)
    variants: list[tuple[str, str, bool]] = []
    for method in available_methods():
        variants.append((method, method, True))
        if method in ("torch_dynamic_int8", "onnx_dynamic_int8"):
            variants.append((f"{method}/linear-only", method, False))
    predictors = [load_fp32(model_dir, max_length=64)]
    artifacts: dict[str, Any] = {}
    for name, method, embeddings in variants:
        artifact = quantize_model(
            model_dir, method, work / "artifacts" / name.replace("/", "-"), quantize_embeddings=embeddings
        )
        artifacts[name] = artifact.to_dict()
        predictor = load_quantized(artifact.path, max_length=64, threads=threads)
        predictor.method = name
        predictors.append(predictor)
        print(f"quantized {name}: {artifact.size_bytes / 1e6:.1f} MB in {artifact.quantize_s:.1f} s", flush=True)

    rows = measure_many(predictors, texts, labels, batch_sizes=[1, 16], repeats=args.repeats)
    relative_to_baseline(rows)
    spec = QuantizationSpec(
        methods=[m for m in available_methods()], choose="fastest_within_tolerance", max_quality_drop=GOAL_DROP
    )
    decision = decide([r for r in rows if "/" not in r.method], spec)

    print(f"\n{len(texts)} validation rows, {threads} threads, max_length 64, p50 of {args.repeats} batches")
    print(format_table(rows))
    print(
        f"\ngoal: >= {GOAL_SPEEDUP:.1f}x fp32 throughput, <= {GOAL_SIZE:.0%} of fp32 size, <= {GOAL_DROP:g} point lost"
    )
    goal = {}
    for r in rows:
        if r.method == FP32:
            continue
        checks = {
            "speed": (r.speedup or 0) >= GOAL_SPEEDUP,
            "size": (r.size_ratio or 1) <= GOAL_SIZE,
            "quality": (r.quality_drop or 0) <= GOAL_DROP,
        }
        goal[r.method] = checks
        missed = [k for k, ok in checks.items() if not ok]
        print(f"  {r.method:<34} {'meets the goal' if not missed else 'misses: ' + ', '.join(missed)}")
    print(f"\ngate (fastest_within_tolerance, spec methods only): {decision.message}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "cpus": os.cpu_count(), "threads": threads, "model": str(model_dir)}
    result = {
        **meta,
        "rows": [r.to_dict() for r in rows],
        "goal": goal,
        "decision": decision.to_dict(),
        "artifacts": artifacts,
    }
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
