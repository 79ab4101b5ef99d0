"""Causal-LM quantization and edge export side by side: fp32 torch, torch int8, ONNX fp32 and ONNX int8 (both with
the KV cache, in ONNX Runtime), and GGUF q8_0, in one run on the same model, prompt and held-out text.

The model is a small GPT-2 (4 layers x 256 wide, 4 heads, like bench/generation.py) with a byte-level BPE tokenizer,
trained for ``--steps`` steps on the bundled dialog corpus (prompt<eos>response<eos>), so that greedy decoding and
perplexity are those of a model that learned something. Each row:

- tokens/s: greedy decoding of ``--new-tokens`` tokens at batch 1 with the KV cache (EOS ignored), median of
  ``--repeats`` runs, the rows interleaved (run r of every row, then run r+1) so a slow spell hits all alike;
- size: the weight files on disk (GGUF: the whole file, tokenizer included);
- perplexity on the validation split (``prompt<eos>response<eos>`` texts) and its change against fp32.

``torch int8 (Conv1D kept)`` is what ``torch_dynamic_int8`` did to a GPT-2 before its Conv1D projections were
converted to Linear: only the LM head and the embedding tables became int8. GGUF's tokens/s needs llama.cpp, which
is not a dependency; its perplexity is llama.cpp's GPT-2 graph computed in NumPy from the read-back tensors.

    .venv/bin/python bench/causal_quantize.py [--threads 2] [--steps 300] [--new-tokens 64] [--repeats 5]
        [--work DIR] [--out bench/results/causal_quantize.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LAYERS, WIDTH, HEADS, CONTEXT = 4, 256, 4, 512


def dialog_dataset(work: Path) -> Path:
    from airflow_llmops.ml.data.chatterbot import load_chatterbot
    from airflow_llmops.ml.data.prepare import prepare_records, serialise
    from airflow_llmops.specs import DatasetSpec

    folder = work / "dialogs"
    if (folder / "validation.parquet").is_file():
        return folder
    uri = "chatterbot://english"
    spec = DatasetSpec(name="dialogs", source=uri, task="causal_lm")
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in serialise(prepare_records(load_chatterbot(uri, kind="dialog"), spec)).items():
        (folder / name).write_bytes(data)
    return folder


def texts(dataset: Path, split: str) -> list[str]:
    import pandas as pd

    from airflow_llmops.ml.training.data import lm_texts
    from airflow_llmops.ml.training.models import EOS

    return lm_texts(pd.read_parquet(dataset / f"{split}.parquet"), EOS)


def build_model(work: Path, train: list[str], steps: int) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from airflow_llmops.ml.training.models import train_bpe_tokenizer

    folder = work / f"gpt2-{LAYERS}x{WIDTH}-{steps}"
    if (folder / "model.safetensors").is_file():
        return folder
    tokenizer = train_bpe_tokenizer(train, CONTEXT)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=CONTEXT,
        n_embd=WIDTH,
        n_layer=LAYERS,
        n_head=HEADS,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        picks = torch.randint(0, len(train), (16,), generator=generator).tolist()
        batch = tokenizer([train[i] for i in picks], padding=True, truncation=True, max_length=64, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            print(f"  step {step}: loss {loss.item():.3f}", flush=True)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def kept_conv1d_size(model_dir: Path) -> int:
    """Bytes of torch_dynamic_int8's state dict for a GPT-2 whose Conv1D projections were not converted."""
    import torch

    from airflow_llmops.ml.quantization.methods import _torch_dynamic_int8, load_model

    quantized = _torch_dynamic_int8(load_model(model_dir, "causal_lm"), True, ())
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(quantized.state_dict(), Path(tmp) / "model.pt")
        return (Path(tmp) / "model.pt").stat().st_size


def main() -> int:  # one linear script: build, quantize, export, measure, print, write
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the small GPT-2")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eval-rows", type=int, default=200, help="validation texts for perplexity")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "causal_quantize.json")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from airflow_llmops.ml.export import export_model
    from airflow_llmops.ml.quantization import load_fp32, load_quantized, quantize_model, set_threads, weights_size
    from airflow_llmops.ml.quantization.causal import torch_greedy

    threads = set_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="causal-quantize-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dataset = dialog_dataset(work)
    train, held_out = texts(dataset, "train"), texts(dataset, "validation")[: args.eval_rows]
    model_dir = build_model(work, train, args.steps)
    print(f"model {model_dir} ({time.perf_counter() - started:.0f} s to train or reuse)", flush=True)

    fp32 = load_fp32(model_dir, max_length=CONTEXT)
    int8_artifact = quantize_model(model_dir, "torch_dynamic_int8", work / "torch_int8")
    onnx_int8_artifact = quantize_model(model_dir, "onnx_dynamic_int8", work / "onnx_int8")
    onnx_fp32_report = export_model(model_dir, "onnx", work / "onnx_fp32", texts=held_out[:8], threads=threads)
    gguf_report = export_model(
        model_dir, "gguf", work / "gguf_q8_0", gguf_type="q8_0", texts=held_out, max_length=CONTEXT, threads=threads
    )
    torch_int8 = load_quantized(int8_artifact.path, max_length=CONTEXT, threads=threads)
    onnx_int8 = load_quantized(onnx_int8_artifact.path, max_length=CONTEXT, threads=threads)
    from airflow_llmops.ml.quantization.causal import OnnxCausalPredictor

    onnx_fp32 = OnnxCausalPredictor(
        threads=threads,
        options=onnx_fp32_report.options,
        method="onnx_fp32",
        task="causal_lm",
        path=Path(onnx_fp32_report.path),
        size_bytes=onnx_fp32_report.size_bytes,
        max_length=CONTEXT,
    )
    prompt = [
        int(i)
        for i in fp32.tokenizer(held_out[0].split(fp32.tokenizer.eos_token)[0] + fp32.tokenizer.eos_token)["input_ids"]
    ]
    n = args.new_tokens
    runners: dict[str, Any] = {
        "fp32 (torch)": lambda: torch_greedy(fp32.model, prompt, n, eos_id=None),  # type: ignore[attr-defined]
        "torch int8 (Conv1D->Linear)": lambda: torch_greedy(torch_int8.model, prompt, n, eos_id=None),  # type: ignore[attr-defined]
        "onnx fp32 (KV cache)": lambda: onnx_fp32.generate_ids(prompt, n, stop_at_eos=False),
        "onnx int8 (KV cache)": lambda: onnx_int8.generate_ids(prompt, n, stop_at_eos=False),  # type: ignore[attr-defined]
    }
    outputs = {name: run() for name, run in runners.items()}  # warm-up, and the tokens each produced
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(args.repeats):
        order = list(runners)
        order = order[r % len(order) :] + order[: r % len(order)]
        for name in order:
            begun = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - begun)
    predictors = {
        "fp32 (torch)": fp32,
        "torch int8 (Conv1D->Linear)": torch_int8,
        "onnx fp32 (KV cache)": onnx_fp32,
        "onnx int8 (KV cache)": onnx_int8,
    }
    fp32_bytes = weights_size(model_dir)
    base_ppl = fp32.perplexity(held_out)
    rows: list[dict[str, Any]] = []
    for name, predictor in predictors.items():
        ppl = base_ppl if predictor is fp32 else predictor.perplexity(held_out)
        rows.append(
            {
                "method": name,
                "tokens_per_s": n / statistics.median(times[name]),
                "size_mb": predictor.size_bytes / 1e6 if predictor is not fp32 else fp32_bytes / 1e6,
                "perplexity": ppl,
                "perplexity_change_pct": (ppl / base_ppl - 1) * 100,
                "greedy_same_as_fp32": sum(a == b for a, b in zip(outputs[name], outputs["fp32 (torch)"], strict=True))
                / n,
            }
        )
    rows.insert(
        2,
        {
            "method": "torch int8 (Conv1D kept: before)",
            "tokens_per_s": None,
            "size_mb": kept_conv1d_size(model_dir) / 1e6,
            "perplexity": None,
            "perplexity_change_pct": None,
            "greedy_same_as_fp32": None,
        },
    )
    gguf_ppl_base = gguf_report.fp32_perplexity
    rows.append(
        {
            "method": "gguf q8_0 (llama.cpp)",
            "tokens_per_s": None,
            "size_mb": gguf_report.size_bytes / 1e6,
            "perplexity": gguf_report.perplexity,
            "perplexity_change_pct": gguf_report.perplexity_change_pct,
            "greedy_same_as_fp32": None,
            "note": f"perplexity against fp32 {gguf_ppl_base:.3f} on unpadded texts "
            "(NumPy reference of llama.cpp's graph)",
        }
    )
    base_rate = rows[0]["tokens_per_s"]
    print(
        f"\n{LAYERS} layers x {WIDTH} wide GPT-2, vocab {len(fp32.tokenizer)}; greedy {n} tokens at batch 1, "
        f"{threads} threads, median of {args.repeats}; perplexity on {len(held_out)} validation texts\n"
    )
    header = (
        f"{'method':<34} {'tokens/s':>9} {'x fp32':>7} {'size MB':>8} {'% fp32':>7} {'perplexity':>10} "
        f"{'change':>8} {'same greedy':>11}"
    )
    print(header)
    for row in rows:
        rate = row["tokens_per_s"]
        cells = [
            f"{row['method']:<34}",
            f"{rate:>9.0f}" if rate else f"{'-':>9}",
            f"{rate / base_rate:>6.2f}x" if rate else f"{'-':>7}",
            f"{row['size_mb']:>8.2f}",
            f"{row['size_mb'] * 1e6 / fp32_bytes * 100:>6.0f}%",
            f"{row['perplexity']:>10.3f}" if row["perplexity"] else f"{'-':>10}",
            f"{row['perplexity_change_pct']:>+7.2f}%" if row["perplexity_change_pct"] is not None else f"{'-':>8}",
            f"{row['greedy_same_as_fp32'] * 100:>10.0f}%" if row["greedy_same_as_fp32"] is not None else f"{'-':>11}",
        ]
        print(" ".join(cells))
    result = {
        "model": {"layers": LAYERS, "width": WIDTH, "heads": HEADS, "vocab": len(fp32.tokenizer), "steps": args.steps},
        "threads": threads,
        "new_tokens": n,
        "repeats": args.repeats,
        "eval_texts": len(held_out),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
