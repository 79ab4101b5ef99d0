"""Data-stage throughput: prepare and validate at growing sizes, and GX against the same checks in pandas.

Synthetic LLM classification records (8 labels, a vocabulary of 5,000 words, 5-40 words a text, 2% exact
duplicates, 0.5% near duplicates, a few emails and over-long rows). Token counts are whitespace counts, so the
numbers measure our code and the libraries, not a tokenizer. Prints a table and writes JSON.

    .venv/bin/python bench/data.py [--sizes 10000,100000,1000000] [--out bench/results/data.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from airflow_llmops.ml.data.prepare import prepare_records
from airflow_llmops.ml.data.validate import _plan, suite_layout, validate_dataset
from airflow_llmops.ml.data.validation_suite import builtin_expectations, quiet_gx, run_suite
from airflow_llmops.specs import DatasetSpec, ValidationSpec

ROOT = Path(__file__).resolve().parents[1]


def synthetic(n: int, seed: int = 0) -> pd.DataFrame:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(5000)]
    texts = [" ".join(rng.choices(words, k=rng.randint(5, 40))) for _ in range(n)]
    for i in range(0, n, 50):  # 2% exact duplicates
        texts[i] = texts[i - 1] if i else texts[i]
    for i in range(7, n, 200):  # 0.5% near duplicates: one word changed
        texts[i] = texts[i - 1].rsplit(" ", 1)[0] + " changed"
    for i in range(13, n, 1000):
        texts[i] += " contact me at someone@example.org"
    return pd.DataFrame({"text": texts, "label": [f"topic{i % 8}" for i in range(n)]})


def pandas_equivalent(frame: pd.DataFrame, expectations: list[Any]) -> dict[str, bool]:
    """The built-in suite's expectations evaluated with plain pandas (what GX is compared with)."""
    out: dict[str, bool] = {}
    for i, exp in enumerate(expectations):
        kind = type(exp).__name__
        col = getattr(exp, "column", None)
        series = frame[col] if col in frame.columns else None
        mostly = getattr(exp, "mostly", 1.0) or 1.0
        lo, hi = getattr(exp, "min_value", None), getattr(exp, "max_value", None)

        def frac(mask: pd.Series, s: pd.Series | None = series) -> float:
            valid = s.notna() if s is not None else mask
            return float(mask[valid].mean()) if valid.any() else 1.0

        def between(v: Any, lo: Any = lo, hi: Any = hi) -> Any:
            ok = True if lo is None else v >= lo
            return ok & (True if hi is None else v <= hi)

        if series is None:
            ok = kind == "ExpectColumnToExist" and col in frame.columns
        elif kind == "ExpectColumnToExist":
            ok = True
        elif kind == "ExpectColumnValuesToNotBeNull":
            ok = float(series.notna().mean()) >= mostly
        elif kind == "ExpectColumnValuesToBeBetween":
            ok = frac(between(series)) >= mostly
        elif kind == "ExpectColumnValuesToBeInSet":
            ok = frac(series.isin(list(exp.value_set))) >= mostly
        elif kind == "ExpectColumnValuesToMatchRegex":
            ok = frac(series.astype(str).str.contains(exp.regex, regex=True)) >= mostly
        elif kind == "ExpectColumnValuesToNotMatchRegex":
            ok = frac(~series.astype(str).str.contains(exp.regex, regex=True)) >= mostly
        elif kind == "ExpectColumnValuesToBeUnique":
            ok = frac(~series.duplicated(keep=False)) >= mostly
        elif kind == "ExpectColumnValuesToBeOfType":
            ok = bool(series.map(lambda v: isinstance(v, str)).all())
        elif kind == "ExpectColumnUniqueValueCountToBeBetween":
            ok = bool(between(series.nunique()))
        elif kind == "ExpectColumnMeanToBeBetween":
            ok = bool(between(series.mean()))
        elif kind == "ExpectColumnMinToBeBetween":
            ok = bool(between(series.min()))
        else:
            raise ValueError(f"no pandas equivalent for {kind}")
        out[f"{i}:{kind}"] = bool(ok)
    return out


def bench_size(n: int) -> dict[str, Any]:
    records = synthetic(n)
    spec = DatasetSpec(name="bench", source="file:///bench.jsonl")
    t0 = time.perf_counter()
    prepared = prepare_records(records, spec)
    prepare_s = time.perf_counter() - t0
    frame = pd.concat([f.assign(split=s) for s, f in prepared.splits.items()], ignore_index=True)
    vspec = ValidationSpec(max_tokens=38, max_quarantine_fraction=0.5, pii_action="redact")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = validate_dataset(frame, vspec, docs_dir=Path(tmp) / "docs")
        validate_s = time.perf_counter() - t0

        plan = _plan(frame, vspec, builtin=True)
        expectations = builtin_expectations(suite_layout(plan), vspec)
        with quiet_gx():
            t0 = time.perf_counter()
            gx_result = run_suite(plan.gx_frame, "bench", expectations, Path(tmp) / "docs2", 5)
            gx_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pandas_verdicts = pandas_equivalent(plan.gx_frame, expectations)
        pandas_s = time.perf_counter() - t0
    gx_verdicts = [bool(r.success) for r in gx_result.results]
    return {
        "rows": n,
        "prepare_s": prepare_s,
        "prepare_rows_per_s": n / prepare_s,
        "validate_s": validate_s,
        "validate_rows_per_s": len(frame) / validate_s,
        "gx_suite_s": gx_s,
        "pandas_same_checks_s": pandas_s,
        "gx_over_pandas": gx_s / pandas_s,
        "verdicts_agree": sorted(gx_verdicts) == sorted(pandas_verdicts.values()),
        "kept_rows": len(frame),
        "removed": prepared.manifest["removed"],
        "quarantined": result.quarantined_count,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data.json")
    args = parser.parse_args()
    bench_size(500)  # warm-up: library imports and first-call costs are not throughput
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        row = bench_size(n)
        rows.append(row)
        print(f"measured {n} rows", flush=True)
    print(
        f"\n{'rows':>9} {'prepare r/s':>12} {'validate r/s':>13} {'GX suite s':>11} {'pandas s':>9} {'GX/pandas':>10}"
        "  agree"
    )
    for r in rows:
        print(
            f"{r['rows']:>9} {r['prepare_rows_per_s']:>12.0f} {r['validate_rows_per_s']:>13.0f} "
            f"{r['gx_suite_s']:>11.2f} {r['pandas_same_checks_s']:>9.3f} {r['gx_over_pandas']:>10.1f}  "
            f"{'yes' if r['verdicts_agree'] else 'NO'}"
        )
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        scale = b["rows"] / a["rows"]
        print(
            f"growth {a['rows']}->{b['rows']} ({scale:.0f}x rows): "
            f"prepare time x{b['prepare_s'] / a['prepare_s']:.1f}, "
            f"validate time x{b['validate_s'] / a['validate_s']:.1f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "cpus": os.cpu_count(), "token_counts": "whitespace"}
    args.out.write_text(json.dumps({**meta, "rows": rows}, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
