"""Export a causal LM for an edge runtime, load the export back, check it and measure it against fp32.

Targets:

- ``onnx``: the GPT-2 decoding graph with the KV cache as inputs/outputs (:mod:`airflow_llmops.ml.quantization.causal`)
  for ONNX Runtime, fp32 or (``onnx_int8``) with ONNX Runtime's dynamic int8 weights. Checked by loading it in
  ONNX Runtime: fp32 logits must match torch's within ``LOGITS_ATOL`` on the check texts and greedy decoding with
  the cache must give torch's tokens; int8 is judged on perplexity like the quantization methods.
- ``gguf``: llama.cpp's format (:mod:`.gguf_file`) in ``f32``, ``f16`` or ``q8_0``. Checked by reading it back with
  ``gguf.GGUFReader``: every tensor against the source weights, the tokenizer metadata, and logits of llama.cpp's
  GPT-2 graph computed from the read-back tensors against torch's.

Both report size against the fp32 weights and the perplexity change on the given texts (gated on
``max_quality_drop`` percent); ``onnx`` also tokens/s of greedy decoding at batch 1 against torch fp32 (with its
KV cache). GGUF's speed needs llama.cpp, which is not a dependency: its row says so instead of inventing a number.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from airflow_llmops.ml.quantization.artifact import local_path, model_folder, weights_size
from airflow_llmops.ml.quantization.errors import QuantizationInputError, UnsupportedTaskError

TARGETS = ("onnx", "gguf")
REPORT_FILE = "export.json"
LOGITS_ATOL = 1e-3  # fp32 ONNX against torch (same arithmetic, different kernels)
GGUF_LOGITS_ATOL = {"f32": 1e-3, "f16": 5e-2}  # q8_0 is judged on perplexity only
DEFAULT_CHECK_TEXTS = ("Hello, how are you today?", "The quick brown fox jumps over the lazy dog.")


class ExportCheckError(QuantizationInputError):
    """The export did not load back as the model it was made from (the message names what differed)."""


@dataclass
class ExportReport:
    """What was exported, how it was checked and what it measured (``export.json`` in the output folder).

    :ivar files: the export's files (relative to ``path``).
    :ivar size_bytes: / :ivar fp32_size_bytes: / :ivar size_ratio: the export's weights against the fp32 folder's.
    :ivar check: what the load-back check compared and its numbers (it raised if anything differed).
    :ivar perplexity: / :ivar fp32_perplexity: / :ivar perplexity_change_pct: on ``texts`` (positive is worse).
    :ivar tokens_per_s: / :ivar fp32_tokens_per_s: greedy decoding at batch 1 with the KV cache (onnx only).
    """

    target: str
    path: str
    source_model: str
    files: list[str]
    size_bytes: int
    fp32_size_bytes: int
    size_ratio: float
    check: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    perplexity: float | None = None
    fp32_perplexity: float | None = None
    perplexity_change_pct: float | None = None
    eval_texts: int = 0
    tokens_per_s: float | None = None
    fp32_tokens_per_s: float | None = None
    speedup: float | None = None
    new_tokens: int = 0
    export_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    max_quality_drop: float | None = None
    passed: bool = True
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_model(
    model_dir: str | Path,
    target: str,
    out_dir: str | Path,
    *,
    texts: Sequence[str] = (),
    gguf_type: str = "f16",
    onnx_int8: bool = False,
    new_tokens: int = 32,
    max_quality_drop: float = 10.0,
    max_length: int = 128,
    threads: int | None = None,
) -> ExportReport:
    """Export the causal LM in ``model_dir`` to ``target`` in ``out_dir`` (replaced when it holds an earlier
    export), load it back and check it, and measure it against fp32 (perplexity on ``texts``, or on a few built-in
    sentences when none are given). ``passed`` is whether the perplexity change is within ``max_quality_drop`` %.

    :raises QuantizationInputError: bad folder, target or type.
    :raises UnsupportedTaskError: not a GPT-2 causal LM (the message names what is supported).
    :raises ExportCheckError: the export did not load back as the model.
    """
    from transformers import AutoTokenizer

    from airflow_llmops.ml.quantization.measure import set_threads

    config = _check_inputs(model_dir, target, gguf_type, new_tokens)
    source = model_folder(model_dir)
    threads = set_threads(threads)
    out = local_path(out_dir)
    if out.resolve() == source.resolve():
        raise QuantizationInputError(f"out_dir {out} is the model folder itself; give a new folder")
    if out.exists() and any(out.iterdir()) and not (out / REPORT_FILE).is_file():
        raise QuantizationInputError(f"out_dir {out} exists and is not an earlier export; give an empty or new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        check_texts = [t for t in (list(texts) or list(DEFAULT_CHECK_TEXTS))]
        started = time.perf_counter()
        if target == "onnx":
            report = _onnx(
                source,
                staging,
                config=config,
                tokenizer=tokenizer,
                texts=check_texts,
                int8=onnx_int8,
                new_tokens=new_tokens,
                max_length=max_length,
                threads=threads,
            )
        else:
            report = _gguf(
                source,
                staging,
                config=config,
                tokenizer=tokenizer,
                texts=check_texts,
                gguf_type=gguf_type,
                max_length=max_length,
            )
        report.export_s = round(time.perf_counter() - started, 3)
        report.source_model = str(source.resolve())
        report.path = str(out)
        report.eval_texts = len(check_texts)
        report.fp32_size_bytes = weights_size(source)
        report.size_ratio = report.size_bytes / report.fp32_size_bytes if report.fp32_size_bytes else 0.0
        if report.perplexity is not None and report.fp32_perplexity:
            report.perplexity_change_pct = (report.perplexity / report.fp32_perplexity - 1) * 100
        report.max_quality_drop = max_quality_drop
        report.passed = report.perplexity_change_pct is None or report.perplexity_change_pct <= max_quality_drop
        report.message = describe(report)
        (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.replace(out)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_inputs(model_dir: str | Path, target: str, gguf_type: str, new_tokens: int) -> Any:
    """The model's config, once the target, type and model are known to be exportable."""
    from transformers import AutoConfig

    from airflow_llmops.ml.export.gguf_file import GGUF_TYPES
    from airflow_llmops.ml.quantization.artifact import detect_task
    from airflow_llmops.ml.quantization.causal import check_architecture

    if target not in TARGETS:
        raise QuantizationInputError(f"unknown export target {target!r}; choose one of {list(TARGETS)}")
    if target == "gguf" and gguf_type not in GGUF_TYPES:
        raise QuantizationInputError(f"unknown gguf_type {gguf_type!r}; choose one of {list(GGUF_TYPES)}")
    if new_tokens < 1:
        raise QuantizationInputError(f"new_tokens must be >= 1, got {new_tokens}")
    source = model_folder(model_dir)
    config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    if detect_task(config) != "causal_lm":
        raise UnsupportedTaskError(
            f"{source} is not a causal LM ({list(config.architectures or [])}); ExportModelOperator exports GPT-2 "
            "causal LMs (GPT2LMHeadModel); export classifiers with QuantizeModelOperator's ONNX methods"
        )
    check_architecture(config)
    return config


def describe(report: ExportReport) -> str:
    parts = [f"{report.target} export: {report.size_bytes / 1e6:.2f} MB ({report.size_ratio * 100:.0f}% of fp32)"]
    if report.perplexity_change_pct is not None:
        parts.append(
            f"perplexity {report.perplexity:.3f} vs fp32 {report.fp32_perplexity:.3f} "
            f"({report.perplexity_change_pct:+.2f}%, max_quality_drop={report.max_quality_drop:g}%)"
        )
    if report.tokens_per_s is not None and report.fp32_tokens_per_s:
        parts.append(
            f"{report.tokens_per_s:.0f} tokens/s vs fp32 torch {report.fp32_tokens_per_s:.0f} "
            f"({report.speedup or 0:.2f}x, greedy, batch 1, {report.new_tokens} tokens)"
        )
    parts.append("load-back check passed")
    verdict = "within tolerance" if report.passed else "over tolerance"
    return f"{verdict}: " + "; ".join(parts)


def _torch_fp32(source: Path) -> torch.nn.Module:
    from airflow_llmops.ml.quantization.methods import load_model

    return load_model(source, "causal_lm")


def _copy_model_files(source: Path, staging: Path, config: Any, tokenizer: Any) -> None:
    config.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))


def _onnx(
    source: Path,
    staging: Path,
    *,
    config: Any,
    tokenizer: Any,
    texts: list[str],
    int8: bool,
    new_tokens: int,
    max_length: int,
    threads: int,
) -> ExportReport:
    from airflow_llmops.ml.quantization import onnx as ox
    from airflow_llmops.ml.quantization.causal import (
        OnnxCausalPredictor,
        conv1d_to_linear,
        export_causal_onnx,
        tokens_per_second,
        torch_greedy,
    )
    from airflow_llmops.ml.quantization.predictors import TorchPredictor, load_fp32

    _copy_model_files(source, staging, config, tokenizer)
    model = _torch_fp32(source)
    conv1d_to_linear(model)  # MatMul rather than Gemm in the graph, which dynamic int8 then reaches
    fp32_file = staging / ("model.fp32.onnx" if int8 else "model.onnx")
    options = export_causal_onnx(model, fp32_file)
    if int8:
        ox.quantize_dynamic_onnx(fp32_file, staging / "model.onnx", ["MatMul", "Gather"])
        fp32_file.unlink()
        options["int8"] = "onnx dynamic int8 (MatMul weights, embedding Gather)"
    files = sorted(p.name for p in staging.iterdir() if p.name.startswith("model.onnx"))
    predictor = OnnxCausalPredictor(
        threads=threads,
        options=options,
        method="onnx_int8" if int8 else "onnx",
        task="causal_lm",
        path=staging,
        size_bytes=weights_size(staging, files),
        max_length=max_length,
    )
    baseline = load_fp32(source, max_length=max_length)
    assert isinstance(baseline, TorchPredictor)
    check: dict[str, Any] = {"runtime": "onnxruntime", "kv_cache": True}
    prompt = [int(i) for i in tokenizer(texts[0])["input_ids"]][: max(1, max_length // 2)]
    steps = max(1, min(new_tokens, predictor.max_length - len(prompt)))
    onnx_tokens = predictor.generate_ids(prompt, steps, stop_at_eos=False)
    torch_tokens = torch_greedy(baseline.model, prompt, steps, eos_id=None)
    agree = sum(a == b for a, b in zip(onnx_tokens, torch_tokens, strict=False)) / max(len(torch_tokens), 1)
    check.update(greedy_tokens=len(torch_tokens), greedy_agreement=agree)
    if not int8:
        worst = _max_logit_difference(predictor, baseline, texts)
        check["max_abs_logit_difference"] = worst
        if worst > LOGITS_ATOL:
            raise ExportCheckError(
                f"the ONNX export's logits differ from torch's by up to {worst:.2e} (> {LOGITS_ATOL:g}) on the check "
                "texts: the graph does not compute the model"
            )
        if onnx_tokens != torch_tokens:
            raise ExportCheckError(
                f"greedy decoding with the KV cache in ONNX Runtime gave {onnx_tokens[:12]}..., torch "
                f"{torch_tokens[:12]}...: the cache inputs/outputs are not wired as the model's"
            )
    rate = tokens_per_second(lambda p, n: predictor.generate_ids(p, n, stop_at_eos=False), prompt, steps)
    base_rate = tokens_per_second(lambda p, n: torch_greedy(baseline.model, p, n, eos_id=None), prompt, steps)
    return ExportReport(
        target="onnx",
        path="",
        source_model="",
        files=files,
        size_bytes=predictor.size_bytes,
        fp32_size_bytes=0,
        size_ratio=0.0,
        check=check,
        options={**options, "int8": int8},
        perplexity=predictor.perplexity(texts),
        fp32_perplexity=baseline.perplexity(texts),
        tokens_per_s=rate["tokens_per_s"],
        fp32_tokens_per_s=base_rate["tokens_per_s"],
        speedup=rate["tokens_per_s"] / base_rate["tokens_per_s"] if base_rate["tokens_per_s"] else None,
        new_tokens=steps,
    )


def _max_logit_difference(predictor: Any, baseline: Any, texts: Sequence[str]) -> float:
    """Largest |ONNX - torch| logit over the real (unpadded) positions of ``texts``."""
    worst = 0.0
    for start in range(0, len(texts), 8):
        chunk = list(texts[start : start + 8])
        mask = np.asarray(predictor.encode(chunk, return_tensors="np")["attention_mask"], dtype=bool)
        diff = np.abs(predictor.logits(chunk) - baseline.logits(chunk))
        worst = max(worst, float(diff[mask].max()))
    return worst


def _gguf(
    source: Path, staging: Path, *, config: Any, tokenizer: Any, texts: list[str], gguf_type: str, max_length: int
) -> ExportReport:
    import gguf

    from airflow_llmops.ml.export.gguf_file import (
        check_gguf,
        read_tensors,
        reference_logits,
        reference_perplexity,
        write_gguf,
    )

    if str(getattr(config, "activation_function", "gelu_new")) not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UnsupportedTaskError(
            f"GGUF export writes llama.cpp's gpt2 graph, whose MLP uses the tanh GELU (gelu_new); this model uses "
            f"{config.activation_function!r}"
        )
    model = _torch_fp32(source)
    name = source.name if source.name != "model" else source.parent.name
    file = staging / f"model-{gguf_type}.gguf"
    planned = write_gguf(
        file, state=model.state_dict(), config=config, tokenizer=tokenizer, gguf_type=gguf_type, name=name
    )
    check: dict[str, Any] = {"reader": f"gguf.GGUFReader ({_version('gguf')})"}
    try:
        check.update(check_gguf(file, planned, config, tokenizer))
    except Exception as err:
        raise ExportCheckError(f"the GGUF file {file.name} does not read back as written: {err}") from None
    tensors = read_tensors(gguf.GGUFReader(str(file)))
    heads, eps = int(config.n_head), float(config.layer_norm_epsilon)
    limit = min(max_length, int(config.n_positions))
    ids = [[int(i) for i in tokenizer(t)["input_ids"]][:limit] for t in texts]
    worst = 0.0
    with torch.inference_mode():
        for seq in ids:
            if not seq:
                continue
            reference = model(torch.tensor([seq])).logits[0].numpy()
            worst = max(worst, float(np.abs(reference_logits(tensors, seq, heads=heads, eps=eps) - reference).max()))
    check["max_abs_logit_difference"] = worst
    atol = GGUF_LOGITS_ATOL.get(gguf_type)
    if atol is not None and worst > atol:
        raise ExportCheckError(
            f"logits of llama.cpp's gpt2 graph from the read-back {gguf_type} tensors differ from torch's by "
            f"{worst:.2e} (> {atol:g}): tensor names or orientation are wrong"
        )
    fp32_ppl = _torch_perplexity(model, ids)
    return ExportReport(
        target="gguf",
        path="",
        source_model="",
        files=[file.name],
        size_bytes=file.stat().st_size,
        fp32_size_bytes=0,
        size_ratio=0.0,
        check=check,
        options={"gguf_type": gguf_type, "architecture": "gpt2", "tokenizer": "gpt2 (BPE)"},
        perplexity=reference_perplexity(tensors, ids, heads=heads, eps=eps),
        fp32_perplexity=fp32_ppl,
        notes=[
            "size includes the tokenizer and metadata; perplexity from llama.cpp's gpt2 graph computed in NumPy on "
            "the read-back tensors; tokens/s needs llama.cpp (llama-cli / llama-bench), which is not installed here"
        ],
    )


def _torch_perplexity(model: torch.nn.Module, ids: Sequence[Sequence[int]]) -> float:
    """The fp32 model's perplexity on the token sequences llama.cpp's graph is scored on (the predictor layer's
    NLL and overflow rule)."""
    from airflow_llmops.ml import predict as P

    nll, count = 0.0, 0
    for seq in ids:
        if len(seq) < 2:
            continue
        tensor = torch.tensor([list(seq)])
        seq_nll, seq_count = P.nll_sum(model, tensor, torch.ones_like(tensor))
        nll, count = nll + seq_nll, count + seq_count
    if count == 0:
        raise QuantizationInputError("perplexity needs texts of at least 2 tokens; every text was shorter")
    return P.perplexity(nll / count)


def _version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
