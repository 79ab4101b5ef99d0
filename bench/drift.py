"""Drift detection quality and speed: false alarms on unshifted traffic, detections when 30% of the traffic is in
another language or on other topics, and run time at 1k, 10k and 100k rows.

Reference: the training split of the chatterbot English topics of the reference DAG minus two held-back topics.
Unshifted windows: held-out (validation, test) English texts of the same topics. Shifted windows: 30% replaced by
Spanish chatterbot texts (``language``) or by the two held-back English topics (``topic``). Predictions of the
replaced rows are drawn from the reference label distribution, so only the input checks can see the shift.
The policy is the drift-monitor DAG's (DriftPolicy's defaults: descriptors by normed Wasserstein >= 0.3, embeddings
by MMD² > 0.0015, two checks must agree). Those thresholds were chosen on windows drawn with seeds 100-139
(``--first-seed 100``); the reported table uses seeds 0-39, which played no part in choosing them. Prints a table
(with each check's score range per traffic kind, the margins) and writes JSON.

    .venv/bin/python bench/drift.py [--windows 40] [--rows 150] [--sizes 1000,10000,100000] [--first-seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from airflow_llmops.ml.data.chatterbot import load_chatterbot
from airflow_llmops.ml.data.prepare import prepare_records, serialise
from airflow_llmops.ml.drift import compute_drift, load_reference, read_window, simulated_records, write_request_log
from airflow_llmops.specs import DatasetSpec, DriftPolicy

ROOT = Path(__file__).resolve().parents[1]
TOPICS = (
    "ai,botprofile,coding,computers,emotion,food,greetings,humor,literature,money,movies,politics,psychology,science"
)
HELD_BACK_TOPICS = "sports,trivia"
POLICY = {"min_rows": 30, "drift_share": 0.25, "min_drifted_checks": 2}
HOUR = 3600.0


def prepare(folder: Path) -> Path:
    uri = f"chatterbot://english?topics={TOPICS}"
    spec = DatasetSpec(name="bench", source=uri, task="classification")
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in serialise(prepare_records(load_chatterbot(uri), spec)).items():
        (folder / name).write_bytes(data)
    return folder


def window_log(
    folder: Path, base: pd.DataFrame, foreign: list[str], labels: list[str], *, n: int, share: float, seed: int
) -> tuple[Path, float]:
    rng = random.Random(seed)
    rows = base.sample(n=n, replace=n > len(base), random_state=seed)
    texts, outputs = rows["text"].tolist(), rows["label"].tolist()
    for i in rng.sample(range(n), int(n * share)):
        texts[i], outputs[i] = rng.choice(foreign), rng.choice(labels)
    end = time.time()
    write_request_log(folder, simulated_records(texts, outputs, start=end - HOUR, end=end, seed=seed))
    return folder, end


def baseline(n: int = 500) -> list[float]:
    rng = random.Random(12345)
    return [max(1.0, rng.gauss(40.0, 8.0)) for _ in range(n)]


def run_windows(
    dataset: Path,
    tmp: Path,
    kind: str,
    foreign: list[str],
    windows: int,
    rows: int,
    held: pd.DataFrame,
    first_seed: int = 0,
) -> dict[str, Any]:
    reference = load_reference(dataset)
    labels = reference.data["label"].astype(str).tolist()
    policy = DriftPolicy.parse(POLICY)
    share = 0.0 if kind == "unshifted" else 0.3
    flagged = 0
    per_check: dict[str, int] = {}
    seconds: list[float] = []
    scores: dict[str, list[float]] = {}
    for seed in range(first_seed, first_seed + windows):
        log, end = window_log(tmp / f"{kind}-{seed}", held, foreign, labels, n=rows, share=share, seed=seed)
        result = compute_drift(
            reference,
            read_window(log, end - HOUR, end + 1),
            policy,
            reference_latency=baseline(),
            cache_dir=tmp / "cache",
        )
        flagged += result.drift
        for name in result.drifted_checks:
            per_check[name] = per_check.get(name, 0) + 1
        seconds.append(result.seconds)
        for name, value in result.scores().items():
            scores.setdefault(name, []).append(value)
    return {
        "windows": windows,
        "rows_per_window": rows,
        "flagged": flagged,
        "rate": flagged / windows,
        "checks_flagged": per_check,
        "mean_seconds": sum(seconds) / len(seconds),
        "score_range": {k: [min(v), max(v)] for k, v in sorted(scores.items())},
    }


def timing(dataset: Path, tmp: Path, held: pd.DataFrame, size: int) -> dict[str, Any]:
    reference = load_reference(dataset)
    labels = reference.data["label"].astype(str).tolist()
    log, end = window_log(tmp / f"size-{size}", held, [], labels, n=size, share=0.0, seed=size)
    started = time.perf_counter()
    window = read_window(log, end - HOUR, end + 1)
    read_s = time.perf_counter() - started
    result = compute_drift(
        reference, window, DriftPolicy.parse(POLICY), reference_latency=baseline(), cache_dir=tmp / "cache"
    )
    return {
        "rows": size,
        "sampled_rows": result.sampled_rows,
        "read_seconds": round(read_s, 2),
        "check_seconds": round(result.seconds, 2),
        "total_seconds": round(read_s + result.seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--rows", type=int, default=150)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds of the windows: first .. first+windows-1")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "drift.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmpdir:
        tmp = Path(tmpdir)
        dataset = prepare(tmp / "reference")
        held = pd.concat([pd.read_parquet(dataset / f"{s}.parquet") for s in ("validation", "test")])
        held = held.reset_index(drop=True)
        spanish = load_chatterbot("chatterbot://spanish")["text"].tolist()
        other = load_chatterbot(f"chatterbot://english?topics={HELD_BACK_TOPICS}")["text"].tolist()
        # Warm-up: model load and the cached reference embeddings are not part of the per-window numbers.
        run_windows(dataset, tmp / "warm", "unshifted", [], 1, args.rows, held)
        seed = args.first_seed
        quality = {
            "unshifted": run_windows(dataset, tmp, "unshifted", [], args.windows, args.rows, held, seed),
            "language_30pct": run_windows(dataset, tmp, "language", spanish, args.windows, args.rows, held, seed),
            "topic_30pct": run_windows(dataset, tmp, "topic", other, args.windows, args.rows, held, seed),
        }
        sizes = [timing(dataset, tmp, held, int(s)) for s in args.sizes.split(",") if s]
    results = {
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()},
        "policy": DriftPolicy.parse(POLICY).to_dict(),
        "seeds": [args.first_seed, args.first_seed + args.windows - 1],
        "quality": quality,
        "sizes": sizes,
    }
    print(f"{'traffic':<16}{'windows':>8}{'flagged':>8}{'rate':>8}{'s/window':>10}  checks")
    for name, row in quality.items():
        print(
            f"{name:<16}{row['windows']:>8}{row['flagged']:>8}{row['rate']:>8.1%}{row['mean_seconds']:>10.1f}"
            f"  {row['checks_flagged']}"
        )
    print("\nscore ranges (min .. max over the windows; thresholds: embeddings > 0.0015, descriptors >= 0.3)")
    shown = ("embeddings", "text_descriptors.oov_rate", "text_descriptors.length", "text_descriptors.non_ascii_share")
    print(f"{'traffic':<16}" + "".join(f"{name.removeprefix('text_descriptors.'):>22}" for name in shown))
    for name, row in quality.items():
        ranges = row["score_range"]
        cells = [f"{ranges[k][0]:.4g} .. {ranges[k][1]:.4g}" if k in ranges else "-" for k in shown]
        print(f"{name:<16}" + "".join(f"{c:>22}" for c in cells))
    print(f"\n{'rows':>8}{'sampled':>9}{'read s':>8}{'check s':>9}{'total s':>9}")
    for row in sizes:
        print(
            f"{row['rows']:>8}{row['sampled_rows']:>9}{row['read_seconds']:>8}{row['check_seconds']:>9}"
            f"{row['total_seconds']:>9}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
