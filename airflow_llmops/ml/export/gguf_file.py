"""GGUF (llama.cpp's file format) for a GPT-2: written with the ``gguf`` package, read back and checked.

Tensor names and metadata keys follow llama.cpp's ``gpt2`` architecture as the ``gguf`` package defines them
(``gguf.MODEL_TENSORS[MODEL_ARCH.GPT2]``): ``token_embd``, ``position_embd``, per block ``attn_norm``,
``attn_qkv`` (the fused query/key/value projection), ``attn_output``, ``ffn_norm``, ``ffn_up``, ``ffn_down``, then
``output_norm`` and ``output``. GPT-2 keeps its projections as ``Conv1D`` (``[in, out]``); GGUF wants
``[out, in]`` like a Linear, so those four weights are transposed. Vectors (norms, biases) stay f32; matrices are
``f32``, ``f16`` or ``q8_0`` (blocks of 32 values with one fp16 scale; a matrix whose rows are not a multiple of
32 falls back to f16, as llama.cpp's converter does). The tokenizer goes in as ``tokenizer.ggml.*``: the ``gpt2``
BPE model, tokens with their types, merges, BOS/EOS/PAD ids and the chat template.

The check reads the file back with ``gguf.GGUFReader``: every tensor against the source weights (f32 exactly,
f16 exactly after the same rounding, q8_0 byte for byte against ``gguf.quants`` and within half a quantization
step plus the scale's fp16 rounding after dequantizing), the architecture's hyperparameters and the tokenizer, then
a NumPy forward pass of llama.cpp's GPT-2 graph made only from the read-back tensors (:func:`reference_logits`),
whose logits must match torch's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGUF_TYPES = ("f32", "f16", "q8_0")
_Q8_BLOCK = 32


class GGUFCheckError(Exception):
    """The written file does not read back as what was written (names, types, values or tokenizer)."""


@dataclass(frozen=True)
class Planned:
    name: str
    source: np.ndarray  # fp32, in GGUF's [out, in] orientation
    qtype: str  # "f32" | "f16" | "q8_0"


def _qtype(name: str) -> Any:
    import gguf

    return {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[name]


def plan_tensors(state: dict[str, Any], config: Any, gguf_type: str) -> list[Planned]:
    """The GGUF tensors of a ``GPT2LMHeadModel`` state dict (Conv1D weights as stored, ``[in, out]``)."""
    import gguf

    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR

    def array(key: str, transpose: bool = False) -> np.ndarray:
        value = state[key].detach().float().cpu().numpy()
        return np.ascontiguousarray(value.T if transpose else value)

    def matrix_type(values: np.ndarray) -> str:
        if gguf_type == "q8_0" and values.shape[-1] % _Q8_BLOCK:
            return "f16"
        return gguf_type

    out: list[Planned] = []

    def add(kind: Any, suffix: str, values: np.ndarray, bid: int | None = None) -> None:
        base = names[kind].format(bid=bid) if bid is not None else names[kind]
        out.append(Planned(f"{base}.{suffix}", values, matrix_type(values) if values.ndim == 2 else "f32"))

    add(T.TOKEN_EMBD, "weight", array("transformer.wte.weight"))
    add(T.POS_EMBD, "weight", array("transformer.wpe.weight"))
    for i in range(int(config.n_layer)):
        p = f"transformer.h.{i}."
        for kind, module, transpose in (
            (T.ATTN_NORM, "ln_1", False),
            (T.ATTN_QKV, "attn.c_attn", True),
            (T.ATTN_OUT, "attn.c_proj", True),
            (T.FFN_NORM, "ln_2", False),
            (T.FFN_UP, "mlp.c_fc", True),
            (T.FFN_DOWN, "mlp.c_proj", True),
        ):
            add(kind, "weight", array(f"{p}{module}.weight", transpose), i)
            add(kind, "bias", array(f"{p}{module}.bias"), i)
    add(T.OUTPUT_NORM, "weight", array("transformer.ln_f.weight"))
    add(T.OUTPUT_NORM, "bias", array("transformer.ln_f.bias"))
    head = "lm_head.weight" if "lm_head.weight" in state else "transformer.wte.weight"  # tied: the same table
    add(T.OUTPUT, "weight", array(head))
    return out


def encode(values: np.ndarray, qtype: str) -> np.ndarray:
    """The bytes (or array) the file stores for ``values`` in ``qtype``."""
    import gguf.quants

    if qtype == "f32":
        return values.astype(np.float32)
    if qtype == "f16":
        return values.astype(np.float16)
    return np.asarray(gguf.quants.quantize(values.astype(np.float32), _qtype("q8_0")))


def tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """tokens (padded to the model's vocab with unused entries), token types, merges, special ids, chat template."""
    import gguf

    count = len(tokenizer)
    tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(list(range(count)))]
    special = set(tokenizer.all_special_ids)
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    types = [
        int(gguf.TokenType.CONTROL)
        if i in special
        else int(gguf.TokenType.USER_DEFINED)
        if i in added
        else int(gguf.TokenType.NORMAL)
        for i in range(count)
    ]
    if vocab_size > count:
        tokens += [f"[PAD{i}]" for i in range(count, vocab_size)]
        types += [int(gguf.TokenType.UNUSED)] * (vocab_size - count)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFCheckError(
            f"GGUF export writes BPE tokenizers (llama.cpp's 'gpt2' model); this one is {model.get('type')}"
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {
        "tokens": tokens,
        "token_types": types,
        "merges": merges,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


def write_gguf(
    path: Path, *, state: dict[str, Any], config: Any, tokenizer: Any, gguf_type: str, name: str
) -> list[Planned]:
    """Write a GPT-2 to ``path``; returns the planned tensors (what :func:`check_gguf` compares against)."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}; choose one of {list(GGUF_TYPES)}")
    planned = plan_tensors(state, config, gguf_type)
    vocab = int(config.vocab_size)
    meta = tokenizer_metadata(tokenizer, vocab)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    writer.add_name(name)
    writer.add_context_length(int(config.n_positions))
    writer.add_embedding_length(int(config.n_embd))
    writer.add_feed_forward_length(int(config.n_inner or 4 * config.n_embd))
    writer.add_block_count(int(config.n_layer))
    writer.add_head_count(int(config.n_head))
    writer.add_layer_norm_eps(float(config.layer_norm_epsilon))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}.get(
        gguf_type, gguf.LlamaFileType.MOSTLY_Q8_0
    )
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_types"])
    writer.add_token_merges(meta["merges"])
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if isinstance(meta[key], int):
            add(meta[key])
    writer.add_add_bos_token(False)
    if meta["chat_template"]:
        writer.add_chat_template(str(meta["chat_template"]))
    for tensor in planned:
        data = encode(tensor.source, tensor.qtype)
        writer.add_tensor(tensor.name, data, raw_dtype=_qtype(tensor.qtype) if tensor.qtype == "q8_0" else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return planned


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        raise GGUFCheckError(f"the GGUF file has no metadata key {key!r}")
    return field.contents()


def read_tensors(reader: Any) -> dict[str, np.ndarray]:
    """Every tensor of the file as fp32 in its numpy (``[out, in]``) orientation (q8_0 dequantized)."""
    import gguf.quants

    out: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        data = np.asarray(tensor.data)
        if tensor.tensor_type == _qtype("q8_0"):
            data = gguf.quants.dequantize(data, tensor.tensor_type)
        shape = tuple(int(n) for n in reversed(tensor.shape))
        out[tensor.name] = np.asarray(data, dtype=np.float32).reshape(shape)
    return out


def check_gguf(path: Path, planned: Sequence[Planned], config: Any, tokenizer: Any) -> dict[str, Any]:
    """Read ``path`` back and compare every tensor and the metadata with what was planned; raise
    :class:`GGUFCheckError` on the first difference. Returns what was checked (counts, largest q8_0 error)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    _check_hyperparameters(reader, config)
    meta = _check_tokenizer(reader, tokenizer_metadata(tokenizer, int(config.vocab_size)))
    tensors = {t.name: t for t in reader.tensors}
    names = {p.name for p in planned}
    if set(tensors) != names:
        raise GGUFCheckError(f"tensor names differ: extra {set(tensors) - names}, missing {names - set(tensors)}")
    values = read_tensors(reader)
    worst_q8 = max((_check_tensor(p, tensors[p.name], values[p.name]) for p in planned), default=0.0)
    return {
        "tensors": len(planned),
        "by_type": {t: sum(p.qtype == t for p in planned) for t in GGUF_TYPES if any(p.qtype == t for p in planned)},
        "tokens": len(meta["tokens"]),
        "merges": len(meta["merges"]),
        "max_abs_q8_0_error": worst_q8,
    }


def _check_hyperparameters(reader: Any, config: Any) -> None:
    import gguf

    K = gguf.Keys
    arch = _field(reader, K.General.ARCHITECTURE)
    if arch != "gpt2":
        raise GGUFCheckError(f"general.architecture reads {arch!r}, expected 'gpt2'")
    expected: dict[str, Any] = {
        K.LLM.CONTEXT_LENGTH: int(config.n_positions),
        K.LLM.EMBEDDING_LENGTH: int(config.n_embd),
        K.LLM.BLOCK_COUNT: int(config.n_layer),
        K.Attention.HEAD_COUNT: int(config.n_head),
        K.LLM.FEED_FORWARD_LENGTH: int(config.n_inner or 4 * config.n_embd),
    }
    for template, value in expected.items():
        key = template.format(arch=arch)
        if _field(reader, key) != value:
            raise GGUFCheckError(f"{key} reads {_field(reader, key)!r}, expected {value!r}")
    eps = _field(reader, K.Attention.LAYERNORM_EPS.format(arch=arch))
    if not math.isclose(eps, float(config.layer_norm_epsilon), rel_tol=1e-6):
        raise GGUFCheckError(f"the layer norm epsilon reads {eps}, expected {config.layer_norm_epsilon}")


def _check_tokenizer(reader: Any, meta: dict[str, Any]) -> dict[str, Any]:
    import gguf

    K = gguf.Keys.Tokenizer
    if _field(reader, K.MODEL) != "gpt2":
        raise GGUFCheckError(f"{K.MODEL} is not 'gpt2'")
    for key, want in ((K.LIST, meta["tokens"]), (K.TOKEN_TYPE, meta["token_types"]), (K.MERGES, meta["merges"])):
        got = list(_field(reader, key))
        if got != list(want):
            raise GGUFCheckError(f"{key} reads back different from the tokenizer's ({len(got)} vs {len(want)} entries)")
    for key, want in ((K.BOS_ID, meta["bos"]), (K.EOS_ID, meta["eos"]), (K.PAD_ID, meta["pad"])):
        if isinstance(want, int) and _field(reader, key) != want:
            raise GGUFCheckError(f"{key} reads {_field(reader, key)!r}, the tokenizer's is {want}")
    if meta["chat_template"] and _field(reader, K.CHAT_TEMPLATE) != meta["chat_template"]:
        raise GGUFCheckError(f"{K.CHAT_TEMPLATE} differs from the tokenizer's chat template")
    return meta


def _check_tensor(planned: Planned, stored: Any, got: np.ndarray) -> float:
    """Compare one read-back tensor with its source; returns the largest q8_0 error (0 for float types)."""
    name, source = planned.name, planned.source
    if stored.tensor_type != _qtype(planned.qtype):
        raise GGUFCheckError(f"{name} is stored as {stored.tensor_type.name}, expected {planned.qtype}")
    if got.shape != source.shape:
        raise GGUFCheckError(f"{name} has shape {got.shape}, the source {source.shape}")
    if planned.qtype == "f32" and not np.array_equal(got, source):
        raise GGUFCheckError(f"{name} differs from the source weights")
    if planned.qtype == "f16" and not np.array_equal(got, source.astype(np.float16).astype(np.float32)):
        raise GGUFCheckError(f"{name} differs from the source weights rounded to f16")
    if planned.qtype != "q8_0":
        return 0.0
    if not np.array_equal(np.asarray(stored.data).reshape(-1), encode(source, "q8_0").reshape(-1)):
        raise GGUFCheckError(f"{name}: the stored q8_0 blocks differ from gguf.quants' encoding")
    blocks = source.reshape(-1, _Q8_BLOCK)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 127.0
    error = np.abs(got.reshape(-1, _Q8_BLOCK) - blocks)
    if np.any(error > 0.6 * step + 1e-12):  # half a step, plus the fp16 rounding of the scale (<= 127 * 2^-11)
        raise GGUFCheckError(f"{name}: a dequantized q8_0 value is more than half a step from the source")
    return float(error.max())


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return np.asarray((x - mean) / np.sqrt(var + eps) * weight + bias)


def _gelu(x: np.ndarray) -> np.ndarray:  # GPT-2's tanh approximation (gelu_new), what llama.cpp's ggml_gelu computes
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def reference_logits(tensors: dict[str, np.ndarray], ids: Sequence[int], *, heads: int, eps: float) -> np.ndarray:
    """llama.cpp's GPT-2 graph in NumPy from GGUF tensors (``[out, in]`` matrices): logits ``[len(ids), vocab]``.
    Not a runtime: a check that the names, orientations and values in the file make the model."""
    t = {k: v.astype(np.float64) for k, v in tensors.items()}
    x = t["token_embd.weight"][list(ids)] + t["position_embd.weight"][: len(ids)]
    n, width = x.shape
    dim = width // heads
    causal = np.triu(np.full((n, n), -np.inf), k=1)
    layer = 0
    while f"blk.{layer}.attn_qkv.weight" in t:
        b = f"blk.{layer}."
        h = _layer_norm(x, t[b + "attn_norm.weight"], t[b + "attn_norm.bias"], eps)
        qkv = h @ t[b + "attn_qkv.weight"].T + t[b + "attn_qkv.bias"]
        q, k, v = (part.reshape(n, heads, dim).transpose(1, 0, 2) for part in np.split(qkv, 3, axis=-1))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(dim) + causal
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = (scores / scores.sum(-1, keepdims=True)) @ v
        x = x + attn.transpose(1, 0, 2).reshape(n, width) @ t[b + "attn_output.weight"].T + t[b + "attn_output.bias"]
        h = _layer_norm(x, t[b + "ffn_norm.weight"], t[b + "ffn_norm.bias"], eps)
        up = _gelu(h @ t[b + "ffn_up.weight"].T + t[b + "ffn_up.bias"])
        x = x + up @ t[b + "ffn_down.weight"].T + t[b + "ffn_down.bias"]
        layer += 1
    x = _layer_norm(x, t["output_norm.weight"], t["output_norm.bias"], eps)
    logits = np.asarray(x @ t["output.weight"].T)
    return logits


def reference_perplexity(
    tensors: dict[str, np.ndarray], texts_ids: Sequence[Sequence[int]], *, heads: int, eps: float
) -> float:
    """Perplexity of token id sequences under :func:`reference_logits` (next-token loss, every position)."""
    nll, count = 0.0, 0
    for ids in texts_ids:
        if len(ids) < 2:
            continue
        logits = reference_logits(tensors, ids, heads=heads, eps=eps)[:-1]
        shifted = logits - logits.max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        nll -= float(log_probs[np.arange(len(ids) - 1), list(ids[1:])].sum())
        count += len(ids) - 1
    if count == 0:
        raise ValueError("perplexity needs texts of at least 2 tokens")
    return math.exp(nll / count)
