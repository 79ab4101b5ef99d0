"""Causal LMs: int8 that really shrinks GPT-2, and an ONNX graph with a KV cache for ONNX Runtime.

GPT-2 stores its projections in ``transformers.pytorch_utils.Conv1D`` (a Linear with a transposed weight), which
``torch.ao``'s dynamic quantization does not know: without help ``torch_dynamic_int8`` leaves every projection of
a GPT-2 in fp32. :func:`conv1d_to_linear` swaps each ``Conv1D`` for an ``nn.Linear`` with the same numbers
(weight transposed) first; the artifact records it (``options.conv1d_to_linear``) and the loader replays it.

ONNX: :class:`DecoderStep` is one decoding step of a GPT-2 with its cache as explicit tensors::

    inputs:  input_ids [batch, sequence], attention_mask [batch, past + sequence],
             past.N.key / past.N.value [batch, heads, past, head_dim] for each layer N
    outputs: logits [batch, sequence, vocab], present.N.key / present.N.value [batch, heads, past + sequence, ...]

so one graph serves the prompt (``past`` of length 0) and every later token (``sequence`` of 1, the present of
the previous step as the past). :class:`OnnxCausalPredictor` runs it in ONNX Runtime: greedy decoding with the
cache, and perplexity from the same graph. Supported architecture: GPT-2 (``GPT2LMHeadModel``).
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from airflow_llmops.ml.quantization.errors import QuantizationInputError, UnsupportedTaskError
from airflow_llmops.ml.quantization.predictors import Predictor

SUPPORTED_MODEL_TYPES = ("gpt2",)
_EXTERNAL_DATA_BYTES = 1_800_000_000


def conv1d_to_linear(model: torch.nn.Module) -> int:
    """Replace every ``transformers`` ``Conv1D`` in ``model`` by an ``nn.Linear`` computing the same thing (weight
    transposed, bias kept); returns how many were replaced (0 for models without them)."""
    from transformers.pytorch_utils import Conv1D

    swaps: list[tuple[torch.nn.Module, str, Any]] = []
    for _, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if isinstance(child, Conv1D):
                swaps.append((parent, child_name, child))
    for parent, child_name, conv in swaps:
        in_features, out_features = conv.weight.shape
        linear = torch.nn.Linear(in_features, out_features, bias=conv.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.detach().t())
            if conv.bias is not None:
                linear.bias.copy_(conv.bias.detach())
        linear.to(dtype=conv.weight.dtype, device=conv.weight.device)
        setattr(parent, child_name, linear)
    return len(swaps)


def check_architecture(config: Any) -> None:
    """Raise :class:`UnsupportedTaskError` naming the supported architectures for a causal LM this path cannot
    export (ONNX with a KV cache, GGUF)."""
    model_type = str(getattr(config, "model_type", "") or "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        architectures = list(getattr(config, "architectures", None) or [])
        raise UnsupportedTaskError(
            f"ONNX/GGUF export of causal LMs supports model_type {list(SUPPORTED_MODEL_TYPES)} (GPT2LMHeadModel); "
            f"this model is {model_type or '?'} ({architectures}); quantize it with torch_dynamic_int8 instead"
        )
    unusual = [
        flag
        for flag in ("add_cross_attention", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")
        if getattr(config, flag, False)
    ]
    if unusual or not getattr(config, "scale_attn_weights", True):
        raise UnsupportedTaskError(
            "the GPT-2 export handles the standard GPT-2 attention only; this config sets "
            f"{unusual or ['scale_attn_weights=False']}"
        )


class DecoderStep(torch.nn.Module):  # type: ignore[misc]  # torch is Any to mypy here
    """One decoding step of a ``GPT2LMHeadModel`` with its KV cache as explicit inputs and outputs (see the module
    docstring). Runs the model's own modules (layer norms, projections, MLP, head), so the exported nodes carry
    their module paths (``transformer.h.N...``) and the layer groups of the accuracy-aware search apply."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        check_architecture(model.config)
        self.model = model
        config = model.config
        self.layers = int(config.n_layer)
        self.heads = int(config.n_head)
        self.head_dim = int(config.n_embd) // self.heads

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor) -> tuple[Any, ...]:
        body = self.model.transformer
        batch, length = input_ids.shape
        # Positions from the mask (left padding gets position 0), the last `length` of them for this step.
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        hidden = body.wte(input_ids) + body.wpe(positions)
        total = attention_mask.shape[1]
        # Query i sits at absolute position total - length + i; it sees keys j <= that which are not padding.
        query_pos = torch.arange(length, device=input_ids.device) + (total - length)
        key_pos = torch.arange(total, device=input_ids.device)
        allowed = (key_pos[None, :] <= query_pos[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
        bias = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
        bias = bias.masked_fill(~allowed, torch.finfo(hidden.dtype).min)
        presents: list[torch.Tensor] = []
        for index, block in enumerate(body.h):
            attn = block.attn
            query, key, value = attn.c_attn(block.ln_1(hidden)).split(self.heads * self.head_dim, dim=2)
            query, key, value = (
                t.reshape(batch, length, self.heads, self.head_dim).transpose(1, 2) for t in (query, key, value)
            )
            key = torch.cat([past[2 * index], key], dim=2)
            value = torch.cat([past[2 * index + 1], value], dim=2)
            presents += [key, value]
            scores = torch.matmul(query, key.transpose(-1, -2)) * (self.head_dim**-0.5) + bias
            context = torch.matmul(torch.softmax(scores, dim=-1), value)
            context = context.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim)
            hidden = hidden + attn.c_proj(context)
            hidden = hidden + block.mlp(block.ln_2(hidden))
        logits = self.model.lm_head(body.ln_f(hidden))
        return (logits, *presents)


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """The graph's past-input and present-output names, key then value for each layer."""
    past = [f"past.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return past, [name.replace("past.", "present.", 1) for name in past]


def export_causal_onnx(model: torch.nn.Module, target: Path) -> dict[str, Any]:
    """Export a GPT-2 ``model`` (fp32, eval) as a :class:`DecoderStep` graph to ``target``; returns the options a
    predictor needs (input/output names, layers, heads, head size, whether weights went to external data)."""
    from airflow_llmops.ml.quantization.onnx import _quiet_loggers

    step = DecoderStep(model).eval()
    past_names, present_names = cache_names(step.layers)
    batch, length, past_length = 2, 3, 4
    ids = torch.randint(0, int(model.config.vocab_size), (batch, length))
    mask = torch.ones(batch, past_length + length, dtype=torch.long)
    past = tuple(torch.randn(batch, step.heads, past_length, step.head_dim) for _ in past_names)
    auto = torch.export.Dim.AUTO
    dynamic: tuple[Any, ...] = (
        {0: auto, 1: auto},
        {0: auto, 1: auto},
        tuple({0: auto, 2: auto} for _ in past_names),
    )
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > _EXTERNAL_DATA_BYTES
    with (
        contextlib.redirect_stdout(io.StringIO()),
        _quiet_loggers("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "onnx_ir"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            step,
            (ids, mask, *past),
            str(target),
            dynamo=True,
            input_names=["input_ids", "attention_mask", *past_names],
            output_names=["logits", *present_names],
            dynamic_shapes=dynamic,
            external_data=external,
            optimize=True,
        )
    return {
        "input_names": ["input_ids", "attention_mask"],
        "past_names": past_names,
        "present_names": present_names,
        "layers": step.layers,
        "heads": step.heads,
        "head_dim": step.head_dim,
        "kv_cache": True,
        "external_data": external,
    }


class OnnxCausalPredictor(Predictor):
    """A GPT-2 exported as a :class:`DecoderStep` graph (fp32 or int8), run by ONNX Runtime on CPU: logits and
    perplexity of whole texts (empty cache), and greedy decoding with the KV cache (:meth:`generate_ids`)."""

    def __init__(self, *, threads: int, options: dict[str, Any], onnx_file: str = "model.onnx", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from airflow_llmops.ml.quantization.onnx import session

        self.threads = threads
        self.past_names = [str(n) for n in options["past_names"]]
        self.present_names = [str(n) for n in options["present_names"]]
        self.heads, self.head_dim = int(options["heads"]), int(options["head_dim"])
        self.session = session(self.path / onnx_file, threads)
        eos = self.tokenizer.eos_token_id
        self.eos_id: int | None = int(eos) if isinstance(eos, int) else None
        #: The graph as a torch-style causal LM (forward with a ``DynamicCache``, greedy ``generate``): what the
        #: evaluation's perplexity and answers and the server's decode loop run on, as they run a torch model.
        self.model = OnnxCausalLM(self)

    def _run(self, ids: np.ndarray, mask: np.ndarray, past: Sequence[np.ndarray]) -> tuple[np.ndarray, list[Any]]:
        feed: dict[str, np.ndarray] = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
        feed.update(zip(self.past_names, past, strict=True))
        out = self.session.run(["logits", *self.present_names], feed)
        return out[0], list(out[1:])

    def _empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.heads, 0, self.head_dim), dtype=np.float32) for _ in self.past_names]

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        batch = self.encode(texts, return_tensors="np")
        ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
        return self._run(ids, mask, self._empty_cache(ids.shape[0]))[0]

    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int, *, stop_at_eos: bool = True) -> list[int]:
        """Greedy decoding at batch 1: the prompt in one step, then one token per step with the KV cache."""
        if not prompt_ids:
            raise QuantizationInputError("generate_ids needs at least one prompt token")
        room = self.max_length - len(prompt_ids)
        steps = min(max_new_tokens, room)
        ids = np.asarray([list(prompt_ids)], dtype=np.int64)
        past = self._empty_cache(1)
        generated: list[int] = []
        for _ in range(max(steps, 0)):
            mask = np.ones((1, past[0].shape[2] + ids.shape[1]), dtype=np.int64)
            logits, past = self._run(ids, mask, past)
            token = int(logits[0, -1].argmax())
            generated.append(token)
            if stop_at_eos and token == self.eos_id:
                break
            ids = np.asarray([[token]], dtype=np.int64)
        return generated


@dataclass
class CausalOutput:
    """What :meth:`OnnxCausalLM.forward` returns: the fields of a transformers ``CausalLMOutputWithPast`` that the
    evaluation and the server read."""

    logits: torch.Tensor
    past_key_values: Any


class OnnxCausalLM:
    """An :class:`OnnxCausalPredictor`'s graph behind the part of a transformers causal LM's interface that
    :mod:`airflow_llmops.ml.predict`, :mod:`airflow_llmops.ml.evaluation` and the server's
    :class:`~airflow_llmops.serving.generation.DecodeEngine` use, so an ONNX artifact is scored and served by the
    same code as a torch model (same labelling, prompts, stop rule, sampling):

    * ``forward(input_ids, attention_mask, position_ids, past_key_values)`` (torch tensors in and out); the cache is
      a plain transformers ``DynamicCache`` holding the graph's ``present`` tensors, so the decode loop can cut and
      merge it (continuous batching). Positions come from the attention mask inside the graph (left padding gets
      position 0), which is what the decode loop's ``position_ids`` say too; they are checked, not fed.
    * ``generate(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, do_sample, temperature,
      top_p)``: left-padded batches, greedy (or sampled with :func:`airflow_llmops.ml.predict.pick_token` from
      torch's global generator), rows stop at any of ``eos_token_id`` and are padded after it.
    * ``config``, ``generation_config`` (when the folder has one), ``parameters()`` (none: the weights live in
      the graph), ``eval()``.
    """

    def __init__(self, predictor: OnnxCausalPredictor) -> None:
        from transformers import AutoConfig

        self.predictor = predictor
        self.config = AutoConfig.from_pretrained(str(predictor.path), local_files_only=True)
        self.generation_config: Any = None
        if (predictor.path / "generation_config.json").is_file():
            from transformers import GenerationConfig

            self.generation_config = GenerationConfig.from_pretrained(str(predictor.path), local_files_only=True)

    def __repr__(self) -> str:
        return f"OnnxCausalLM(method={self.predictor.method!r}, path={str(self.predictor.path)!r})"

    def eval(self) -> OnnxCausalLM:
        return self

    def parameters(self) -> Iterator[torch.Tensor]:
        return iter(())

    def __call__(self, **kwargs: Any) -> CausalOutput:
        return self.forward(**kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = True,
    ) -> CausalOutput:
        """One pass of the graph: logits ``[batch, sequence, vocab]`` and the cache extended by ``sequence``."""
        from transformers.cache_utils import DynamicCache

        ids = input_ids.detach().cpu().numpy().astype(np.int64)
        past_length = int(past_key_values.get_seq_length()) if past_key_values is not None else 0
        if attention_mask is None:
            mask = np.ones((ids.shape[0], past_length + ids.shape[1]), dtype=np.int64)
        else:
            mask = attention_mask.detach().cpu().numpy().astype(np.int64)
        if mask.shape != (ids.shape[0], past_length + ids.shape[1]):
            raise QuantizationInputError(
                f"attention_mask {mask.shape} must cover the cache and the new tokens "
                f"({ids.shape[0]}, {past_length} + {ids.shape[1]})"
            )
        if position_ids is not None:
            implied = (np.cumsum(mask, axis=-1) - 1).clip(min=0)[:, -ids.shape[1] :]
            given = position_ids.detach().cpu().numpy()
            real = mask[:, -ids.shape[1] :] == 1  # padding's positions do not matter
            if given.shape != implied.shape or not np.array_equal(given[real], implied[real]):
                raise QuantizationInputError(
                    "the ONNX graph derives positions from the attention mask; position_ids that differ from "
                    "cumsum(mask) - 1 cannot be honoured"
                )
        if past_length:
            past = [
                np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=np.float32)
                for layer in past_key_values.layers
                for tensor in (layer.keys, layer.values)
            ]
        else:
            past = self.predictor._empty_cache(ids.shape[0])
        logits, present = self.predictor._run(ids, mask, past)
        cache = DynamicCache(
            ddp_cache_data=[
                (torch.from_numpy(present[i]), torch.from_numpy(present[i + 1])) for i in range(0, len(present), 2)
            ]
        )
        return CausalOutput(torch.from_numpy(logits), cache)

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        pad_token_id: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        **unused: Any,
    ) -> torch.Tensor:
        """The prompts followed by their new tokens (``[batch, prompt + new]``; a row that stopped is padded with
        ``pad_token_id``), as ``transformers``' ``generate`` returns them."""
        from airflow_llmops.ml.predict import GREEDY_BELOW, pick_token

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        pad = int(pad_token_id) if pad_token_id is not None else (min(stops) if stops else 0)
        sample = do_sample and temperature >= GREEDY_BELOW
        ids, mask = input_ids.long(), attention_mask.long()
        out: list[torch.Tensor] = [ids]
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        cache: Any = None
        step = ids
        for _ in range(max(0, max_new_tokens)):
            result = self.forward(step, mask, past_key_values=cache)
            cache, logits = result.past_key_values, result.logits[:, -1, :]
            if sample:
                tokens = torch.tensor([pick_token(row, temperature, top_p) for row in logits])
            else:
                tokens = logits.argmax(dim=-1)
            tokens = torch.where(done, torch.full_like(tokens, pad), tokens)
            out.append(tokens[:, None])
            done |= torch.tensor([int(t) in stops for t in tokens.tolist()])
            if bool(done.all()):
                break
            step = tokens[:, None]
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
        return torch.cat(out, dim=1)


def torch_greedy(
    model: torch.nn.Module, prompt_ids: Sequence[int], max_new_tokens: int, *, eos_id: int | None
) -> list[int]:
    """Greedy decoding at batch 1 with transformers' own KV cache, one forward per token (the reference an ONNX
    graph is checked against, and torch's tokens/s without ``generate()``'s per-step overhead)."""
    import inspect

    # transformers 5 renamed the cache argument and output `past_key_values` -> `cache`.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    cache: Any = None
    generated: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            out = model(input_ids=ids, use_cache=True, **({name: cache} if cache is not None else {}))
            cache = out[name]
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
            if eos_id is not None and token == eos_id:
                break
            ids = torch.tensor([[token]], dtype=torch.long)
    return generated


def tokens_per_second(generate: Any, prompt_ids: Sequence[int], new_tokens: int, repeats: int = 3) -> dict[str, float]:
    """Median tokens/s of ``generate(prompt_ids, new_tokens)`` (batch 1, greedy, EOS ignored) over ``repeats`` runs
    after one warm-up; also the tokens it produced."""
    generate(prompt_ids, new_tokens)
    rates, produced = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        produced = len(generate(prompt_ids, new_tokens))
        rates.append(produced / (time.perf_counter() - started))
    return {"tokens_per_s": float(np.median(rates)), "tokens": float(produced)}
