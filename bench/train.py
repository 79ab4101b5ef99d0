"""Training throughput and quality on this machine, side by side in one run.

1. tokens/s of the same torchrun job started through the local platform (what TrainModelOperator does:
   submit, then poll) and started directly with subprocess.run (goal: ratio >= 0.95);
2. 2-process DDP against 1 process (same global batch);
3. achieved training FLOP/s (6 x parameters x tokens/s) as a fraction of this machine's measured fp32 matmul peak;
4. the fine-tuned MiniLM classifier against a TF-IDF + logistic-regression baseline on the held-out test split.

    .venv/bin/python bench/train.py [--speed-steps 40] [--epochs 4] [--out bench/results/train.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def prepare(folder: Path) -> Path:
    """The reference pipeline's dataset (its chatterbot topics), prepared by the data stage's code."""
    from airflow_llmops.ml.data.chatterbot import load_chatterbot
    from airflow_llmops.ml.data.prepare import prepare_records, serialise
    from airflow_llmops.pipelines import TOPICS
    from airflow_llmops.specs import DatasetSpec

    spec = DatasetSpec(name="bench", source=f"chatterbot://english?topics={TOPICS}")
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in serialise(prepare_records(load_chatterbot(spec.source), spec)).items():
        (folder / name).write_bytes(data)
    return folder


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def parameters(model_dir: str) -> int:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters())


def spec_for(dataset: Path, **overrides: Any) -> Any:
    from airflow_llmops.specs import TrainingSpec

    base = {
        "dataset_uri": str(dataset),
        "max_seq_length": 64,
        "per_device_batch_size": 16,
        "checkpoint_every_steps": 10_000,
        "log_every_steps": 5,
        "learning_rate": 1e-4,
        "warmup_ratio": 0.1,
    }
    return TrainingSpec.parse({**base, **overrides})


def via_platform(jobs: Path, name: str, spec: Any) -> dict[str, Any]:
    from airflow_llmops.platforms import get_platform

    platform_ = get_platform("local", jobs_root=str(jobs))
    t0 = time.perf_counter()
    handle = platform_.submit_training(spec, job_name=name)
    while not (status := platform_.get_training_status(handle)).state.is_terminal:
        time.sleep(1.0)  # the operator's poll
    wall = time.perf_counter() - t0
    final = json.loads((jobs / name / "status.json").read_text())
    assert status.state.value == "succeeded", platform_.describe_training(handle)
    return {"wall_s": wall, **final["metrics"], "world_size": final["world_size"], "model_uri": final["model_uri"]}


def direct(jobs: Path, name: str, spec: Any) -> dict[str, Any]:
    from airflow_llmops.platforms.local import LocalPlatform
    from airflow_llmops.processes import free_port

    platform_ = LocalPlatform(jobs)
    job_dir = jobs / name
    job_dir.mkdir(parents=True)
    (job_dir / "spec.json").write_text(spec.to_json())
    t0 = time.perf_counter()
    subprocess.run(
        platform_.command(spec, job_dir, master_port=free_port()),
        check=True,
        capture_output=True,
        env=os.environ.copy(),
    )
    wall = time.perf_counter() - t0
    final = json.loads((job_dir / "status.json").read_text())
    return {"wall_s": wall, **final["metrics"], "world_size": final["world_size"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed-steps", type=int, default=40)
    parser.add_argument("--epochs", type=float, default=6.0)
    parser.add_argument("--quality-lr", type=float, default=1.5e-4)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train.json")
    args = parser.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # measure training, not a tracking server
    os.environ["HF_HUB_OFFLINE"] = "1"

    from airflow_llmops.ml.evaluation import evaluate_classifier, tfidf_logreg_baseline

    work = Path(tempfile.mkdtemp(prefix="llmops-bench-train-"))
    dataset = prepare(work / "dataset")
    jobs = work / "jobs"
    peak = matmul_peak()
    rows: dict[str, Any] = {"matmul_peak_flops": peak}

    speed = {"max_steps": args.speed_steps, "distributed": {"nproc_per_node": 2}}
    rows["operator_path_2proc"] = via_platform(jobs, "speed-platform", spec_for(dataset, **speed))
    rows["direct_torchrun_2proc"] = direct(jobs, "speed-direct", spec_for(dataset, **speed))
    one = {"max_steps": args.speed_steps * 2, "per_device_batch_size": 16, "distributed": {"nproc_per_node": 1}}
    two = {"max_steps": args.speed_steps * 2, "per_device_batch_size": 8, "distributed": {"nproc_per_node": 2}}
    rows["ddp_1proc"] = direct(jobs, "ddp-1", spec_for(dataset, **one))
    rows["ddp_2proc"] = direct(jobs, "ddp-2", spec_for(dataset, **two))

    # The reference DAG's training defaults: 2 processes x 8 = a global batch of 16, warm-up 10%.
    quality_spec = spec_for(
        dataset,
        epochs=args.epochs,
        learning_rate=args.quality_lr,
        per_device_batch_size=8,
        distributed={"nproc_per_node": 2},
    )
    quality = via_platform(jobs, "quality", quality_spec)
    minilm = evaluate_classifier(quality["model_uri"], dataset, split="test", max_length=64)
    baseline = tfidf_logreg_baseline(dataset, split="test")
    n_params = parameters(quality["model_uri"])
    flops = 6 * n_params * rows["operator_path_2proc"]["tokens_per_s"]
    rows.update({"quality_run": quality, "minilm_test": minilm, "baseline_test": baseline, "parameters": n_params})

    op, dr = rows["operator_path_2proc"], rows["direct_torchrun_2proc"]
    print(f"{'measurement':<44} {'value':>14}")
    table = [
        ("tokens/s via the local platform (2 proc)", f"{op['tokens_per_s']:,.0f}"),
        ("tokens/s, same torchrun run directly", f"{dr['tokens_per_s']:,.0f}"),
        ("ratio operator path / direct", f"{op['tokens_per_s'] / dr['tokens_per_s']:.3f}"),
        ("wall s via platform / direct", f"{op['wall_s']:.1f} / {dr['wall_s']:.1f}"),
        ("tokens/s 1 process (batch 16)", f"{rows['ddp_1proc']['tokens_per_s']:,.0f}"),
        ("tokens/s 2-process DDP (2 x batch 8)", f"{rows['ddp_2proc']['tokens_per_s']:,.0f}"),
        (
            "DDP speed-up 2 proc / 1 proc",
            f"{rows['ddp_2proc']['tokens_per_s'] / rows['ddp_1proc']['tokens_per_s']:.2f}",
        ),
        ("fp32 matmul peak (GFLOP/s)", f"{peak / 1e9:.1f}"),
        ("achieved training GFLOP/s (6 N tokens/s)", f"{flops / 1e9:.1f}"),
        ("fraction of matmul peak", f"{flops / peak:.2%}"),
        (f"MiniLM test accuracy ({args.epochs:g} epochs, 2 proc)", f"{minilm['accuracy']:.4f}"),
        ("TF-IDF + LR test accuracy", f"{baseline['accuracy']:.4f}"),
        ("MiniLM test macro-F1", f"{minilm['macro_f1']:.4f}"),
        ("TF-IDF + LR test macro-F1", f"{baseline['macro_f1']:.4f}"),
        ("energy kWh per 1k training tokens", f"{quality.get('energy_kwh_per_1k_tokens') or float('nan'):.3g}"),
    ]
    for label, value in table:
        print(f"{label:<44} {value:>14}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "cpus": os.cpu_count(), "test_rows": minilm["rows"]}
    args.out.write_text(json.dumps({**meta, **rows}, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
