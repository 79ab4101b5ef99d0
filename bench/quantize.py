"""Quantization on this machine: fp32 MiniLM against every CPU method, in one table.

Fine-tunes MiniLM on the chatterbot topics with the reference DAG's training config (6 epochs, lr 1.5e-4, max
sequence 64, a global batch of 16; one process here), then quantizes it with every method available here, plus
"linear-only" variants that keep the embedding tables in fp32, ONNX static int8 with every layer quantized and the
accuracy-aware variants ("/search": the layers whose int8 costs too much on the validation split stay in fp32).
All are measured interleaved, with the same threads: size on disk, p50 latency at batch 1 and 16, throughput at
batch 16, and quality on the validation split (where the search tuned) and on the test split (where nothing was
tuned or chosen: the number that counts).

Goal: a method within 1 point of fp32 accuracy on the test split, >= 1.8x fp32 throughput at batch 1 and
>= 1.5x at batch 16, <= 35% of fp32 size. A row that misses says by how much.

    .venv/bin/python bench/quantize.py [--epochs 6] [--threads 2] [--repeats 30] [--work DIR]
        [--calibration-method percentile] [--out bench/results/quantize.json]

``--work DIR`` keeps the dataset and the fine-tuned model there and reuses them on the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

GOAL_SPEEDUP_B1, GOAL_SPEEDUP_B16, GOAL_SIZE, GOAL_DROP = 1.8, 1.5, 0.35, 1.0


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


def goal_checks(row: Any, fp32: Any) -> dict[str, dict[str, Any]]:
    """Each goal: the value, the target and whether it is met (quality on the test split)."""
    b1 = fp32.latency_ms[1]["p50"] / row.latency_ms[1]["p50"]
    b16 = fp32.latency_ms[16]["p50"] / row.latency_ms[16]["p50"]
    drop = row.confirm_drop if row.confirm_drop is not None else row.quality_drop
    return {
        "speed_b1": {"value": round(b1, 3), "goal": f">= {GOAL_SPEEDUP_B1}x", "met": b1 >= GOAL_SPEEDUP_B1},
        "speed_b16": {"value": round(b16, 3), "goal": f">= {GOAL_SPEEDUP_B16}x", "met": b16 >= GOAL_SPEEDUP_B16},
        "size": {"value": round(row.size_ratio, 4), "goal": f"<= {GOAL_SIZE:.0%}", "met": row.size_ratio <= GOAL_SIZE},
        "quality": {"value": round(drop, 3), "goal": f"<= {GOAL_DROP:g} point", "met": drop <= GOAL_DROP},
    }


def shortfall(name: str, check: dict[str, Any]) -> str:
    value = check["value"]
    if name.startswith("speed"):
        target = GOAL_SPEEDUP_B1 if name == "speed_b1" else GOAL_SPEEDUP_B16
        return f"{name} {value:.2f}x ({target - value:.2f}x short)"
    if name == "size":
        return f"size {value:.0%} ({(value - GOAL_SIZE) * 100:.0f} points over)"
    return f"test drop {value:+.2f} ({value - GOAL_DROP:.2f} points over)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=6.0)
    parser.add_argument("--lr", type=float, default=1.5e-4)
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--repeats", type=int, default=30, help="timed batches per method and batch size")
    parser.add_argument("--max-eval-rows", type=int, default=1000)
    parser.add_argument("--calibration-method", default="percentile", choices=["minmax", "entropy", "percentile"])
    parser.add_argument("--calibration-rows", type=int, default=128)
    parser.add_argument("--max-trials", type=int, default=16, help="accuracy-aware search budget per method")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quantize.json")
    args = parser.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from airflow_llmops.ml.quantization import (
        FP32,
        SEARCHABLE_METHODS,
        available_methods,
        decide,
        format_table,
        load_fp32,
        load_quantized,
        measure_many,
        quantize_model,
        search_quantization,
        set_threads,
    )
    from airflow_llmops.ml.quantization.compare import confirm, eval_texts, relative_to_baseline
    from airflow_llmops.specs import QuantizationSpec

    work = args.work or Path(tempfile.mkdtemp(prefix="llmops-bench-quantize-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dataset, model_dir = fine_tune(work, args.epochs, args.lr)
    print(f"model {model_dir} ({time.perf_counter() - started:.0f} s to train or reuse)", flush=True)
    threads = set_threads(args.threads)
    texts, labels = eval_texts(dataset, "validation", args.max_eval_rows)
    calibration = texts[: args.calibration_rows]
    baseline = load_fp32(model_dir, max_length=64)

    # (row name, method, quantize embeddings too, accuracy-aware search)
    variants: list[tuple[str, str, bool, bool]] = []
    for method in available_methods():
        variants.append((method, method, True, False))
        if method in ("torch_dynamic_int8", "onnx_dynamic_int8"):
            variants.append((f"{method}/linear-only", method, False, False))
        if method in SEARCHABLE_METHODS and method != "onnx_dynamic_int8":
            variants.append((f"{method}/search", method, True, True))
    predictors = [baseline]
    artifacts: dict[str, Any] = {}
    for name, method, embeddings, search in variants:
        out = work / "artifacts" / name.replace("/", "-")
        common: dict[str, Any] = {
            "quantize_embeddings": embeddings,
            "calibration_texts": calibration,
            "calibration_method": args.calibration_method,
            "max_length": 64,
        }
        if search:
            artifact = search_quantization(
                model_dir,
                method,
                out,
                texts,
                labels,
                max_quality_drop=GOAL_DROP,
                max_trials=args.max_trials,
                threads=threads,
                baseline=baseline,
                **common,
            )
        else:
            artifact = quantize_model(model_dir, method, out, **common)
        artifacts[name] = artifact.to_dict()
        predictor = load_quantized(artifact.path, max_length=64, threads=threads)
        predictor.method = name
        predictors.append(predictor)
        found = artifact.options.get("search")
        note = f"; search: {found['summary']}" if found else ""
        print(f"quantized {name}: {artifact.size_bytes / 1e6:.1f} MB in {artifact.quantize_s:.1f} s{note}", flush=True)

    rows = measure_many(predictors, texts, labels, batch_sizes=[1, 16], repeats=args.repeats)
    for row in rows:
        meta = artifacts.get(row.method)
        if meta and meta["method"] in SEARCHABLE_METHODS:
            row.fp32_layers = list(meta["options"].get("fp32_layers", []))
    relative_to_baseline(rows)
    confirm(predictors, rows, dataset, "test", args.max_eval_rows)
    spec = QuantizationSpec(
        methods=list(available_methods()), choose="fastest_within_tolerance", max_quality_drop=GOAL_DROP
    )
    decision = decide([r for r in rows if "/" not in r.method], spec)
    fp32 = next(r for r in rows if r.method == FP32)

    print(
        f"\n{len(texts)} validation rows (quality, latency), {fp32.confirm_split} split for the test drop, "
        f"{threads} threads, max_length 64, p50 of {args.repeats} batches"
    )
    print(format_table(rows))
    print(
        f"\ngoal: within {GOAL_DROP:g} point of fp32 on the test split, >= {GOAL_SPEEDUP_B1}x fp32 throughput at "
        f"batch 1 and >= {GOAL_SPEEDUP_B16}x at batch 16, <= {GOAL_SIZE:.0%} of fp32 size"
    )
    goal: dict[str, Any] = {}
    for r in rows:
        if r.method == FP32:
            continue
        checks = goal_checks(r, fp32)
        goal[r.method] = {k: v["met"] for k, v in checks.items()} | {
            "values": {k: v["value"] for k, v in checks.items()}
        }
        missed = [shortfall(k, v) for k, v in checks.items() if not v["met"]]
        b1, b16 = checks["speed_b1"]["value"], checks["speed_b16"]["value"]
        numbers = f"{b1:.2f}x b1, {b16:.2f}x b16, {r.size_ratio:.0%} size, test drop {checks['quality']['value']:+.2f}"
        verdict = "meets the goal" if not missed else "misses: " + "; ".join(missed)
        print(f"  {r.method:<34} {numbers}: {verdict}")
    met = [m for m, g in goal.items() if all(g[k] for k in ("speed_b1", "speed_b16", "size", "quality"))]
    print(f"\nmethods that meet the whole goal: {', '.join(met) or 'none'}")
    print(f"gate (fastest_within_tolerance on validation, spec methods only): {decision.message}")

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
