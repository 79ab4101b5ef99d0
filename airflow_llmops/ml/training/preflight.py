"""Checks that fail fast, before any weights load: precision support and whether a batch fits in memory.

On CPU a batch that does not fit is not an exception: the kernel's OOM killer ends the process (or the machine
swaps to a crawl). So the activation memory of one step is estimated from the model's config and compared with
the memory this process can use, and an absurd batch size becomes a message instead of a kill.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from airflow_llmops.ml.training.errors import TrainingInputError

GIB = 1024**3
# Reject only above this share of the available memory: the estimate is approximate and the OS needs some.
USABLE_SHARE = 0.9


def check_precision(precision: str, *, cuda: bool) -> None:
    """fp32 runs everywhere; mixed precision only where the device has the kernels for it."""
    if precision == "fp32":
        return
    if not cuda:
        raise TrainingInputError(
            f"precision={precision!r} needs a CUDA GPU and this machine has none; use precision='fp32' on CPU"
        )
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise TrainingInputError(
            f"precision='bf16' is not supported by GPU {torch.cuda.get_device_name()}; use 'fp16' or 'fp32'"
        )


@dataclass(frozen=True)
class Dims:
    layers: int
    hidden: int
    heads: int
    vocab: int
    intermediate: int
    positions: int

    @property
    def parameters(self) -> int:
        # Attention (4 h^2) and MLP (2 h * ffn) per layer, plus token and position embeddings.
        per_layer = 4 * self.hidden**2 + 2 * self.hidden * self.intermediate
        return self.layers * per_layer + (self.vocab + self.positions) * self.hidden


def model_dims(config: Any) -> Dims | None:
    """Transformer sizes from a Hugging Face config (the common attribute names map across model families);
    ``None`` where the config does not say, and the first-step OOM check is all that is left."""
    try:
        hidden = int(config.hidden_size)
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
    except (AttributeError, TypeError, ValueError):
        return None
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    positions = getattr(config, "max_position_embeddings", None) or 0
    return Dims(layers, hidden, heads, int(getattr(config, "vocab_size", 0) or 0), int(intermediate), int(positions))


@dataclass(frozen=True)
class MemoryEstimate:
    fixed_bytes: int
    per_sample_bytes: int

    def total(self, batch: int) -> int:
        return self.fixed_bytes + batch * self.per_sample_bytes


def estimate_memory(dims: Dims, *, seq: int, precision: str, causal_lm: bool, lora: bool) -> MemoryEstimate:
    """Bytes for one training step of one process.

    Activations kept for the backward pass follow Korthikanti et al. (2022, "Reducing Activation Recomputation in
    Large Transformer Models"): ``s*h*(34 + 5*a*s/h)`` bytes per sample and layer at 16-bit, doubled for fp32.
    A causal LM also holds logits over the vocabulary (logits, softmax and their gradient). Full fine-tuning keeps
    weights, gradients and two Adam moments in fp32 (16 bytes per parameter); LoRA trains a tiny fraction.
    """
    scale = 2 if precision == "fp32" else 1
    per_layer = seq * dims.hidden * (34 + 5 * dims.heads * seq / dims.hidden) * scale
    per_sample = dims.layers * per_layer + 2 * seq * dims.hidden * 2 * scale
    if causal_lm:
        per_sample += 3 * seq * dims.vocab * 2 * scale
    fixed = dims.parameters * (5 if lora else 16)
    return MemoryEstimate(fixed_bytes=int(fixed), per_sample_bytes=math.ceil(per_sample))


def _cgroup_limit() -> int | None:
    """A container's memory limit, which /proc/meminfo does not show."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def _host_available() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory(*, cuda: bool, local_processes: int) -> int | None:
    """Bytes one process may use: free memory of its GPU, or its share of the host's available RAM (the
    processes of one node share it)."""
    if cuda:
        free, _total = torch.cuda.mem_get_info()
        return int(free)
    host = _host_available()
    limit = _cgroup_limit()
    candidates = [v for v in (host, limit) if v is not None]
    if not candidates:
        return None
    return min(candidates) // max(1, local_processes)


def check_batch_fits(
    config: Any,
    *,
    batch: int,
    seq: int,
    precision: str,
    causal_lm: bool,
    lora: bool,
    cuda: bool,
    local_processes: int,
) -> MemoryEstimate | None:
    """Raise a :class:`TrainingInputError` naming a batch size that fits when this one cannot."""
    dims = model_dims(config)
    available = available_memory(cuda=cuda, local_processes=local_processes)
    if dims is None or available is None:
        return None
    estimate = estimate_memory(dims, seq=seq, precision=precision, causal_lm=causal_lm, lora=lora)
    budget = available * USABLE_SHARE
    if estimate.total(batch) <= budget:
        return estimate
    where = "GPU" if cuda else f"RAM share of each of {local_processes} process(es) on this machine"
    fits = int((budget - estimate.fixed_bytes) // estimate.per_sample_bytes)
    advice = (
        f"use per_device_batch_size <= {fits} (keep the effective batch with gradient_accumulation_steps)"
        if fits >= 1
        else "the model alone does not fit: use LoRA, fewer processes per node, or a machine with more memory"
    )
    raise TrainingInputError(
        f"per_device_batch_size={batch} with max_seq_length={seq} ({precision}) needs about "
        f"{estimate.total(batch) / GIB:,.1f} GiB per process, but only {available / GIB:,.1f} GiB is available "
        f"({where}); {advice}, or lower max_seq_length"
    )


def explain_out_of_memory(err: BaseException, batch: int, seq: int) -> TrainingInputError | None:
    """An input error naming the batch size for an out-of-memory failure, ``None`` for any other error.

    CUDA raises ``torch.OutOfMemoryError``; the CPU allocator raises a RuntimeError naming the failed allocation
    (when the kernel lets it fail rather than killing the process).
    """
    text = str(err)
    lowered = text.lower()
    oom = isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in lowered or "can't allocate memory" in lowered)
    )
    if not oom:
        return None
    first_line = text.splitlines()[0] if text else type(err).__name__
    return TrainingInputError(
        f"out of memory at per_device_batch_size={batch}, max_seq_length={seq}: lower per_device_batch_size "
        f"(keep the effective batch with gradient_accumulation_steps) or max_seq_length ({first_line})"
    )


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
