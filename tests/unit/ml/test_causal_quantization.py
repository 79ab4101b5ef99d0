"""Quantization of a causal LM (a tiny GPT-2 trained on dialog text): torch int8 that really shrinks GPT-2 (its
Conv1D projections converted to Linear first) and still loads and generates, through the model server too; the ONNX
graph with a KV cache whose greedy decoding in ONNX Runtime matches torch's token for token; ONNX dynamic int8 of a
causal LM through quantize_model and compare(); clear errors for what is not supported."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import prepare_chatterbot, require_module

require_module("onnxruntime")
require_module("transformers")

from tiny_causal import build_tiny_gpt2, build_tiny_llama, dialog_texts  # noqa: E402

pytestmark = pytest.mark.xdist_group("causal-quantization")


@pytest.fixture(scope="module")
def dialogs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_chatterbot(tmp_path_factory.mktemp("data") / "dialogs", kind="dialog")


@pytest.fixture(scope="module")
def gpt2(dialogs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "model", dialog_texts(dialogs))


@pytest.fixture(scope="module")
def held_out(dialogs: Path) -> list[str]:
    return dialog_texts(dialogs, "validation")[:24]


def _prompt(model_dir: Path, text: str = "what is your name?") -> list[int]:
    from transformers import AutoTokenizer

    return [int(i) for i in AutoTokenizer.from_pretrained(str(model_dir))(text)["input_ids"]]


def test_conv1d_to_linear_computes_the_same_logits(gpt2: Path) -> None:
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    from airflow_llmops.ml.quantization.causal import conv1d_to_linear

    model = GPT2LMHeadModel.from_pretrained(str(gpt2)).eval()
    ids = torch.tensor([_prompt(gpt2)])
    with torch.inference_mode():
        before = model(ids).logits
    assert conv1d_to_linear(model) == 4 * model.config.n_layer  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    with torch.inference_mode():
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert conv1d_to_linear(model) == 0


def test_torch_int8_shrinks_gpt2_loads_back_and_is_served(gpt2: Path, held_out: list[str], tmp_path: Path) -> None:
    import torch
    from transformers.pytorch_utils import Conv1D

    from airflow_llmops.ml.quantization import TorchPredictor, load_fp32, load_quantized, quantize_model, weights_size
    from airflow_llmops.ml.quantization.causal import torch_greedy
    from airflow_llmops.serving.models import GenerationParams, load_model
    from airflow_llmops.serving.sources import resolve_source

    artifact = quantize_model(gpt2, "torch_dynamic_int8", tmp_path / "int8")
    assert artifact.options["conv1d_to_linear"] == 8
    fp32_bytes = weights_size(gpt2)
    # Every projection is int8 now (before the conversion they all stayed fp32: 85% of this model's weights).
    assert artifact.size_bytes < 0.4 * fp32_bytes, (artifact.size_bytes, fp32_bytes)
    predictor = load_quantized(artifact.path)
    assert isinstance(predictor, TorchPredictor)
    quantized_linear = torch.ao.nn.quantized.dynamic.Linear
    kinds = {type(m) for m in predictor.model.modules()}
    assert Conv1D not in kinds and quantized_linear in kinds
    assert sum(isinstance(m, quantized_linear) for m in predictor.model.modules()) == 8 + 1  # + lm_head
    baseline = load_fp32(gpt2)
    fp32_ppl, int8_ppl = baseline.perplexity(held_out), predictor.perplexity(held_out)
    assert fp32_ppl < len(baseline.tokenizer) / 4  # trained: far below the uniform perplexity (the vocabulary size)
    assert abs(int8_ppl / fp32_ppl - 1) < 0.05, (fp32_ppl, int8_ppl)

    # The model server loads the artifact through the quantization loader and generates with the int8 model.
    served = load_model(resolve_source(str(artifact.path)))
    prompt = "what is your name?<|endoftext|>"  # as the model was trained: prompt<eos>response<eos>
    answer = served.generate(
        prompt, GenerationParams(max_tokens=8, temperature=0.0), on_text=None, cancelled=threading.Event()
    )
    eos = predictor.tokenizer.eos_token_id
    expected = torch_greedy(predictor.model, _prompt(gpt2, prompt), 8, eos_id=eos)
    expected = expected[:-1] if expected[-1] == eos else expected
    assert expected and answer.completion_tokens == len(expected), (answer, expected)
    assert answer.text == predictor.tokenizer.decode(expected, skip_special_tokens=True)
    close = getattr(served, "close", None)
    if close is not None:
        close()


def test_onnx_graph_with_kv_cache_matches_torch(gpt2: Path, tmp_path: Path) -> None:
    import torch
    from transformers import GPT2LMHeadModel

    from airflow_llmops.ml.quantization.causal import OnnxCausalPredictor, export_causal_onnx, torch_greedy

    model = GPT2LMHeadModel.from_pretrained(str(gpt2)).eval()
    folder = tmp_path / "onnx"
    folder.mkdir()
    model.config.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((gpt2 / name).read_bytes())
    options = export_causal_onnx(model, folder / "model.onnx")
    assert options["past_names"][:2] == ["past.0.key", "past.0.value"]
    predictor = OnnxCausalPredictor(
        threads=1, options=options, method="onnx", task="causal_lm", path=folder, size_bytes=0, max_length=64
    )
    prompt = _prompt(gpt2)
    onnx_tokens = predictor.generate_ids(prompt, 24, stop_at_eos=False)
    assert onnx_tokens == torch_greedy(model, prompt, 24, eos_id=None)
    assert len(set(onnx_tokens)) > 2  # a trained model: not one token repeated

    # The cache is what makes the steps agree: the last step's logits equal a full forward of the whole sequence.
    sequence = prompt + onnx_tokens[:10]
    with torch.inference_mode():
        full = model(torch.tensor([sequence])).logits[0, -1].numpy()
    ids, mask = np.asarray([prompt]), np.ones((1, len(prompt)), dtype=np.int64)
    _, past = predictor._run(ids, mask, predictor._empty_cache(1))
    for token in onnx_tokens[:10]:
        mask = np.ones((1, past[0].shape[2] + 1), dtype=np.int64)
        logits, past = predictor._run(np.asarray([[token]]), mask, past)
    assert past[0].shape == (1, options["heads"], len(sequence), options["head_dim"])
    np.testing.assert_allclose(logits[0, -1], full, atol=1e-4)

    # A right-padded batch: the real positions match torch's.
    texts = ["hi", "what is your name? i am a bot"]
    mask = predictor.encode(texts, return_tensors="np")["attention_mask"].astype(bool)
    with torch.inference_mode():
        reference = model(**predictor.encode(texts)).logits.numpy()
    np.testing.assert_allclose(predictor.logits(texts)[mask], reference[mask], atol=1e-4)


def test_onnx_dynamic_int8_of_a_causal_lm_compared_and_gated(gpt2: Path, dialogs: Path, tmp_path: Path) -> None:
    from airflow_llmops.ml.quantization import compare, format_table, load_quantized
    from airflow_llmops.ml.quantization.causal import OnnxCausalPredictor
    from airflow_llmops.specs import QuantizationSpec

    spec = QuantizationSpec(
        methods=["torch_dynamic_int8", "onnx_dynamic_int8"],
        max_quality_drop=10.0,
        max_eval_rows=16,
        batch_sizes=[1, 4],
        latency_repeats=2,
        accuracy_aware=True,
        threads=1,
    )
    report = compare(gpt2, dialogs, spec, tmp_path / "q")
    table = format_table(report.rows)
    fp32 = report.row("fp32")
    for method in spec.methods:
        row = report.row(method)
        assert row.ok, (method, row.error)
        assert row.quality_drop is not None and abs(row.quality_drop) < 10, table
        assert row.size_bytes < 0.5 * fp32.size_bytes, table
    assert report.decision.passed and report.decision.chosen in spec.methods, report.decision.message
    # A causal LM's speed in the gate is how fast it generates (greedy decode at batch 1 with the KV cache), not a
    # forward pass over whole texts: the chosen method is the fastest decoder, and ONNX Runtime's one-call decode
    # step beats eager torch's (~16x on a 4 x 256 GPT-2 in bench/causal_quantize.py).
    speeds = {r.method: r.decode_tokens_s for r in report.rows}
    assert all(v is not None and v > 0 for v in speeds.values()), speeds
    assert report.decision.chosen == max(spec.methods, key=lambda m: speeds[m] or 0.0), (speeds, table)
    assert (speeds["onnx_dynamic_int8"] or 0.0) > (speeds["fp32"] or 0.0), (speeds, table)
    assert "decode tok/s" in table and "tokens/s (greedy decode" in report.decision.message, report.decision.message
    onnx = load_quantized(report.row("onnx_dynamic_int8").artifact or "")
    assert isinstance(onnx, OnnxCausalPredictor)
    tokens = onnx.generate_ids(_prompt(gpt2), 6, stop_at_eos=False)
    assert len(tokens) == 6


def test_unsupported_causal_lms_are_refused_clearly(gpt2: Path, tmp_path: Path) -> None:

    from airflow_llmops.ml.quantization import UnsupportedTaskError, quantize_model

    with pytest.raises(UnsupportedTaskError, match=r"onnx_static_int8.*classification.*onnx_dynamic_int8"):
        quantize_model(gpt2, "onnx_static_int8", tmp_path / "static", calibration_texts=["hello there"])
    llama = tmp_path / "llama"
    build_tiny_llama(llama, gpt2)
    with pytest.raises(UnsupportedTaskError, match=r"supports model_type \['gpt2'\].*llama"):
        quantize_model(llama, "onnx_dynamic_int8", tmp_path / "llama-int8")
    assert not (tmp_path / "llama-int8").exists()
