"""Edge export of a causal LM (a tiny GPT-2 trained on dialog text) with ExportModelOperator under ``dag.test()``:
ONNX with a KV cache (int8, run in ONNX Runtime) and GGUF q8_0 for llama.cpp, each loaded back and checked by the
operator, then checked again here independently (the GGUF file read with ``gguf.GGUFReader``, every tensor against
the model's weights under llama.cpp's GPT-2 names); sizes shrink, perplexity stays within tolerance, and what
cannot be exported fails with a message that says what is supported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import prepare_chatterbot, require_module

require_module("onnxruntime")
require_module("gguf")

from tiny_causal import build_tiny_gpt2, build_tiny_llama, dialog_texts  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("export-model")]


@pytest.fixture(scope="module")
def dialogs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_chatterbot(tmp_path_factory.mktemp("data") / "dialogs", kind="dialog")


@pytest.fixture(scope="module")
def gpt2(dialogs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "model", dialog_texts(dialogs))


def _source_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's gpt2 names, written out here by hand (not with the exporter's map)."""
    from safetensors.numpy import load_file

    state = load_file(str(model_dir / "model.safetensors"))
    out = {
        "token_embd.weight": state["transformer.wte.weight"],
        "position_embd.weight": state["transformer.wpe.weight"],
        "output_norm.weight": state["transformer.ln_f.weight"],
        "output_norm.bias": state["transformer.ln_f.bias"],
        "output.weight": state.get("lm_head.weight", state["transformer.wte.weight"]),
    }
    layer = 0
    while f"transformer.h.{layer}.ln_1.weight" in state:
        p = f"transformer.h.{layer}."
        for gguf_name, hf_name in (
            ("attn_norm", "ln_1"),
            ("attn_qkv", "attn.c_attn"),
            ("attn_output", "attn.c_proj"),
            ("ffn_norm", "ln_2"),
            ("ffn_up", "mlp.c_fc"),
            ("ffn_down", "mlp.c_proj"),
        ):
            weight = state[f"{p}{hf_name}.weight"]
            out[f"blk.{layer}.{gguf_name}.weight"] = weight.T if weight.ndim == 2 else weight  # Conv1D is [in, out]
            out[f"blk.{layer}.{gguf_name}.bias"] = state[f"{p}{hf_name}.bias"]
        layer += 1
    return out


def _read_gguf(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], object]:
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    values, types = {}, {}
    for tensor in reader.tensors:
        data = dequantize(np.asarray(tensor.data), tensor.tensor_type)
        values[tensor.name] = np.asarray(data, dtype=np.float32).reshape([int(n) for n in reversed(tensor.shape)])
        types[tensor.name] = tensor.tensor_type.name
    return values, types, reader


def test_gguf_f32_and_f16_read_back_equal_to_the_weights(gpt2: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from airflow_llmops.ml.export import export_model

    source = _source_tensors(gpt2)
    tokenizer = AutoTokenizer.from_pretrained(str(gpt2))
    for kind in ("f32", "f16"):
        report = export_model(gpt2, "gguf", tmp_path / kind, gguf_type=kind, threads=1)
        values, types, reader = _read_gguf(tmp_path / kind / report.files[0])
        assert set(values) == set(source)
        for name, weight in source.items():
            want = weight if kind == "f32" or weight.ndim == 1 else weight.astype(np.float16).astype(np.float32)
            assert values[name].shape == weight.shape and np.array_equal(values[name], want), name
            assert types[name] == ("F32" if kind == "f32" or weight.ndim == 1 else "F16"), name
        fields = reader.fields  # type: ignore[attr-defined]
        assert fields["general.architecture"].contents() == "gpt2"
        assert fields["gpt2.block_count"].contents() == 2
        assert fields["tokenizer.ggml.model"].contents() == "gpt2"
        tokens = fields["tokenizer.ggml.tokens"].contents()
        assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
        assert report.check["max_abs_logit_difference"] < (1e-4 if kind == "f32" else 2e-2)
        assert report.perplexity_change_pct is not None and abs(report.perplexity_change_pct) < 0.5
    assert (tmp_path / "f16" / "model-f16.gguf").stat().st_size < 0.6 * (
        tmp_path / "f32" / "model-f32.gguf"
    ).stat().st_size


def test_export_dag_onnx_int8_and_gguf_q8_0(airflow_db: Path, gpt2: Path, dialogs: Path) -> None:
    from dags_under_test import load_dag
    from transformers import AutoTokenizer

    from airflow_llmops.ml.quantization.causal import OnnxCausalPredictor

    dag = load_dag("llmops_test_export", folder="tests/dags", module="llmops_test_export", attr="export_dag")
    run = dag.test(run_conf={"model_uri": str(gpt2), "dataset_uri": str(dialogs), "gguf_type": "q8_0"})
    onnx_ti, gguf_ti = run.get_task_instance("export_onnx"), run.get_task_instance("export_gguf")
    assert onnx_ti.state == "success" and gguf_ti.state == "success"

    onnx = onnx_ti.xcom_pull(task_ids="export_onnx")
    json.dumps(onnx)  # JSON-able
    assert onnx["target"] == "onnx" and onnx["passed"] and onnx["eval_texts"] == 16
    assert onnx["size_ratio"] < 0.5, onnx  # int8 weights (embedding table included)
    assert abs(onnx["perplexity_change_pct"]) < 10 and onnx["tokens_per_s"] > 0 and onnx["fp32_tokens_per_s"] > 0
    assert onnx["check"]["kv_cache"] and onnx["check"]["greedy_tokens"] == 16
    folder = Path(onnx["export_uri"].removeprefix("file://"))
    assert json.loads((folder / "export.json").read_text())["target"] == "onnx"
    predictor = OnnxCausalPredictor(
        threads=1,
        options=json.loads((folder / "export.json").read_text())["options"],
        method="onnx",
        task="causal_lm",
        path=folder,
        size_bytes=0,
        max_length=64,
    )
    prompt = AutoTokenizer.from_pretrained(str(gpt2))("what is your name?<|endoftext|>")["input_ids"]
    assert len(predictor.generate_ids(prompt, 5, stop_at_eos=False)) == 5  # the files load and decode elsewhere

    gg = gguf_ti.xcom_pull(task_ids="export_gguf")
    assert gg["target"] == "gguf" and gg["passed"] and gg["options"]["gguf_type"] == "q8_0"
    assert gg["size_ratio"] < 0.45, gg  # q8_0 matrices (8.5 bits per weight), vectors in f32, tokenizer included
    assert gg["check"]["by_type"] == {"f32": 18, "q8_0": 11}
    assert abs(gg["perplexity_change_pct"]) < 2
    values, types, _ = _read_gguf(Path(gg["export_uri"].removeprefix("file://")) / "model-q8_0.gguf")
    for name, weight in _source_tensors(gpt2).items():
        if weight.ndim == 1:
            assert types[name] == "F32" and np.array_equal(values[name], weight), name
        else:
            assert types[name] == "Q8_0", name
            blocks = weight.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(values[name].reshape(-1, 32) - blocks) <= 0.6 * step + 1e-9), name


def test_export_refuses_what_it_cannot_export(
    airflow_db: Path, gpt2: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from dags_under_test import load_dag

    from airflow_llmops.ml.export import export_model

    # Over the tolerance: a gate that no export can meet fails with the numbers.
    report = export_model(gpt2, "gguf", tmp_path / "strict", gguf_type="q8_0", max_quality_drop=-50.0, threads=1)
    assert (
        not report.passed and report.message.startswith("over tolerance") and "max_quality_drop=-50%" in report.message
    )

    llama = tmp_path / "llama"
    build_tiny_llama(llama, gpt2)
    dag = load_dag("llmops_test_export", folder="tests/dags", module="llmops_test_export", attr="export_dag")
    run = dag.test(run_conf={"model_uri": str(llama), "dataset_uri": ""})
    assert run.get_task_instance("export_onnx").state == "failed"
    assert run.get_task_instance("export_gguf").state == "failed"
    out, err = capfd.readouterr()
    assert "supports model_type ['gpt2'] (GPT2LMHeadModel); this model is llama" in out + err
