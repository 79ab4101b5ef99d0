"""LoRA against full fine-tuning of a causal LM on chat data, side by side in one run.

The same chat fine-tuning job (the training stage's real code, started with torchrun as the local platform starts
it) from the same base model, once updating every weight and once with LoRA adapters (merged into the artifact,
as the pipelines keep them). Measured per run: training tokens/s, wall time, the peak resident memory of the
training process, trainable parameters, the artifact's size and the validation perplexity on assistant tokens.

The base is a GPT-2-style model larger than the offline default (``--layers`` x ``--width``), first trained on the
same conversations (``--base-steps``, full fine-tuning) so that both runs start from a model that already knows the
corpus; LoRA's point is a smaller optimizer state and gradient memory, which shows once the model is not tiny.

    .venv/bin/python bench/lora.py [--layers 6] [--width 384] [--steps 40] [--out bench/results/lora.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Runs the command it is given and prints the largest resident set of the processes it waited for (torchrun's
# worker is its child, so RUSAGE_CHILDREN of this wrapper covers it); one wrapper per run keeps runs apart.
_PEAK_RSS = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)


def prepare(folder: Path) -> Path:
    """The chat pipeline's dataset (chatterbot dialogs as conversations), prepared by the data stage's code."""
    from airflow_llmops.ml.data.chatterbot import load_chatterbot
    from airflow_llmops.ml.data.prepare import prepare_records, serialise
    from airflow_llmops.pipelines import TOPICS
    from airflow_llmops.specs import DatasetSpec

    source = f"chatterbot://english?topics={TOPICS}"
    spec = DatasetSpec(name="bench-chat", source=source, task="chat")
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in serialise(prepare_records(load_chatterbot(source, kind="chat"), spec)).items():
        (folder / name).write_bytes(data)
    return folder


def spec_for(dataset: Path, **overrides: Any) -> Any:
    from airflow_llmops.specs import TrainingSpec

    base = {
        "task": "chat",
        "dataset_uri": str(dataset),
        "max_seq_length": 128,
        "per_device_batch_size": 8,
        "checkpoint_every_steps": 10_000,
        "log_every_steps": 10,
        "warmup_ratio": 0.1,
        "distributed": {"nproc_per_node": 1},
    }
    return TrainingSpec.parse({**base, **overrides})


def run(jobs: Path, name: str, spec: Any) -> dict[str, Any]:
    """One training job, as the local platform starts it, with its wall time and peak memory."""
    from airflow_llmops.platforms.local import LocalPlatform
    from airflow_llmops.processes import free_port

    job_dir = jobs / name
    job_dir.mkdir(parents=True)
    (job_dir / "spec.json").write_text(spec.to_json())
    command = LocalPlatform(jobs).command(spec, job_dir, master_port=free_port())
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, *command], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"training {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    peak_kb = int(done.stdout.rsplit("peak_rss_kb", 1)[1].split()[0])
    final = json.loads((job_dir / "status.json").read_text())
    model_dir = Path(str(final["model_uri"]).removeprefix("file://"))
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return {"wall_s": wall, "peak_rss_mb": peak_kb / 1024, "model_mb": size / 1e6, **final["metrics"]}


def _model_dir(job_dir: Path) -> str:
    return str(json.loads((job_dir / "status.json").read_text())["model_uri"]).removeprefix("file://")


def trainable(model_dir: str, lora: dict[str, Any] | None) -> tuple[int, int]:
    """(trainable, total) parameters of the model as the run trains it: all of them, or the adapters'."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    total = sum(p.numel() for p in model.parameters())
    if lora is None:
        return total, total
    from airflow_llmops.ml.training.models import apply_lora
    from airflow_llmops.specs import LoraSpec

    wrapped = apply_lora(model, LoraSpec.model_validate(lora), "chat")  # what the training run wraps
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad), total


def build_base(template_dir: Path, out: Path, *, layers: int, width: int, positions: int) -> Path:
    """A GPT-2 of ``layers`` x ``width`` with the default model's trained tokenizer and chat template."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(str(template_dir))
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=positions,
        n_embd=width,
        n_layer=layers,
        n_head=max(1, width // 64),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    template = template_dir / "chat_template.jinja"
    if template.is_file():
        (out / "chat_template.jinja").write_text(template.read_text())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--base-steps", type=int, default=60)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora.json")
    args = parser.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # measure training, not a tracking server
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

    work = Path(tempfile.mkdtemp(prefix="llmops-bench-lora-"))
    dataset = prepare(work / "dataset")
    jobs = work / "jobs"
    # The offline default (a tokenizer trained on these conversations, role markers, chat template), 1 step.
    run(jobs, "tokenizer", spec_for(dataset, max_steps=1))
    template_dir = Path(_model_dir(jobs / "tokenizer"))
    random_base = build_base(template_dir, work / "random-base", layers=args.layers, width=args.width, positions=128)
    pre = run(jobs, "base", spec_for(dataset, model=str(random_base), max_steps=args.base_steps, learning_rate=5e-4))
    base = _model_dir(jobs / "base")

    lora = {"r": args.rank, "alpha": 2 * args.rank, "merge": True}
    rows: dict[str, Any] = {"base_pretraining": pre}
    rows["full"] = run(jobs, "full", spec_for(dataset, model=base, max_steps=args.steps, learning_rate=2e-4))
    rows["lora"] = run(jobs, "lora", spec_for(dataset, model=base, max_steps=args.steps, learning_rate=1e-3, lora=lora))
    rows["full"]["trainable"], rows["full"]["parameters"] = trainable(base, None)
    rows["lora"]["trainable"], rows["lora"]["parameters"] = trainable(base, lora)

    full, low = rows["full"], rows["lora"]
    print(
        f"base: GPT-2 {args.layers} x {args.width}, {full['parameters'] / 1e6:.1f} M parameters; "
        f"{args.steps} steps each"
    )
    print(f"{'measurement':<36} {'full FT':>12} {'LoRA r=' + str(args.rank):>12} {'LoRA / full':>12}")
    for label, key, fmt in (
        ("trainable parameters", "trainable", "{:,.0f}"),
        ("training tokens/s", "tokens_per_s", "{:,.0f}"),
        ("wall s (process start to end)", "wall_s", "{:.1f}"),
        ("peak RSS of the training process MB", "peak_rss_mb", "{:,.0f}"),
        ("artifact MB (merged)", "model_mb", "{:.1f}"),
        ("validation perplexity (assistant)", "eval_perplexity", "{:.2f}"),
    ):
        a, b = full.get(key), low.get(key)
        ratio = f"{b / a:.3f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else "-"
        fa = fmt.format(a) if isinstance(a, (int, float)) else "-"
        fb = fmt.format(b) if isinstance(b, (int, float)) else "-"
        print(f"{label:<36} {fa:>12} {fb:>12} {ratio:>12}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "cpus": os.cpu_count(), "layers": args.layers, "width": args.width}
    args.out.write_text(json.dumps({**meta, "steps": args.steps, **rows}, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
