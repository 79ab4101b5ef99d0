"""Served models in-process (loaders, classification, token-by-token generation), and the tiny model folders and
server launcher the other serving tests share."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import require_module

from airflow_llmops.processes import ManagedProcess, free_port, http_ok

_MODELS = Path(tempfile.mkdtemp(prefix="llmops-serving-models-"))
atexit.register(shutil.rmtree, _MODELS, ignore_errors=True)
LABELS = {0: "greetings", 1: "food", 2: "money"}
LM_CONTEXT = 64
TEXTS = [
    "hello there, how are you today?",
    "I would like a pizza with extra cheese.",
    "How much money is in my bank account?",
    "Good morning! Nice to meet you.",
    "The soup was too salty for dinner.",
    "Interest rates went up again this year.",
] * 20


def build_classifier(root: Path = _MODELS) -> Path:
    """all-MiniLM-L6-v2 with a fresh 3-label head (untrained: the labels are arbitrary, the shapes are real)."""
    folder = root / "classifier"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from airflow_llmops.ml.models import resolve_model_path

    base = resolve_model_path("all-MiniLM-L6-v2")
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}
    )
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def build_tiny_lm(root: Path = _MODELS) -> Path:
    """A 2-layer, 64-wide GPT-2 from config with a byte-level BPE tokenizer trained on a few sentences."""
    folder = root / "tiny-lm"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import GPT2LMHeadModel

    from airflow_llmops.ml.training.models import tiny_gpt2_config, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(TEXTS, LM_CONTEXT)
    torch.manual_seed(0)
    eos, pad = tokenizer.convert_tokens_to_ids([tokenizer.eos_token, tokenizer.pad_token])
    model = GPT2LMHeadModel(
        tiny_gpt2_config(vocab_size=len(tokenizer), max_seq_length=LM_CONTEXT, eos_id=eos, pad_id=pad)
    )
    with torch.no_grad():  # random weights: keep EOS from winning early, so generations have some length
        model.transformer.wte.weight[eos] = 0.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@dataclass
class Server:
    url: str
    process: ManagedProcess
    workdir: Path

    @property
    def log_text(self) -> str:
        return self.process.log_path.read_text(errors="replace")


def start_server(workdir: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 90.0) -> Server:
    """``airflow-llmops serve`` on a free loopback port, once ``/readyz`` answers 200."""
    port = free_port()
    argv = [sys.executable, "-m", "airflow_llmops.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    process = ManagedProcess(f"serve-{port}", argv, workdir / f"serve-{port}.log", env=full_env).start()
    url = f"http://127.0.0.1:{port}"
    process.wait_until(lambda: http_ok(f"{url}/readyz"), timeout=timeout, what="readiness", interval=0.3)
    return Server(url, process, workdir)


# ---- in-process tests of the served models -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier_dir() -> Path:
    return build_classifier()


@pytest.fixture(scope="module")
def lm_dir() -> Path:
    return build_tiny_lm()


def test_loader_picks_the_classifier_and_batches_texts(classifier_dir: Path) -> None:
    from airflow_llmops.serving.models import HFClassifier, load_model
    from airflow_llmops.serving.sources import resolve_source

    model = load_model(resolve_source(f"file://{classifier_dir}"))
    assert isinstance(model, HFClassifier)
    one = model.classify(["hello there"])[0]
    batch = model.classify(["hello there", "a much longer sentence about the price of bread and butter"])
    assert set(one.scores) == set(LABELS.values())
    assert one.label == max(one.scores, key=one.scores.__getitem__)
    assert abs(sum(one.scores.values()) - 1) < 1e-5
    # Padding in a batch must not change a text's answer.
    assert batch[0].label == one.label
    assert abs(batch[0].score - one.score) < 1e-4
    assert batch[1].tokens > batch[0].tokens == one.tokens


def test_generation_streams_the_same_text_it_returns_and_honours_limits(lm_dir: Path) -> None:
    from airflow_llmops.serving.errors import BadRequest
    from airflow_llmops.serving.models import GenerationParams, HFCausalLM, load_model
    from airflow_llmops.serving.sources import resolve_source

    model = load_model(resolve_source(str(lm_dir)))
    assert isinstance(model, HFCausalLM)
    params = GenerationParams(max_tokens=12, temperature=0.0)
    pieces: list[str] = []
    streamed = model.generate("hello there", params, on_text=pieces.append, cancelled=threading.Event())
    again = model.generate("hello there", params, on_text=None, cancelled=threading.Event())
    assert "".join(pieces) == streamed.text == again.text  # greedy is deterministic; stream == final text
    assert streamed.completion_tokens <= 12
    assert streamed.finish_reason in ("stop", "length")
    sampled = GenerationParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    a = model.generate("hi", sampled, on_text=None, cancelled=threading.Event())
    b = model.generate("hi", sampled, on_text=None, cancelled=threading.Event())
    assert a.text == b.text  # same seed, same sample
    # A top_p too small for float32 (found by the fuzzer: 5e-324 became 0 and kept no token) keeps the top token.
    nucleus_of_one = GenerationParams(max_tokens=8, temperature=1.0, top_p=5e-324, seed=3)
    tiny = model.generate("hello there", nucleus_of_one, on_text=None, cancelled=threading.Event())
    greedy = model.generate(
        "hello there", GenerationParams(max_tokens=8, temperature=0.0), on_text=None, cancelled=threading.Event()
    )
    assert tiny.text == greedy.text
    if streamed.text.strip():
        stop = streamed.text.strip()[:2]
        cut = model.generate(
            "hello there",
            GenerationParams(max_tokens=12, temperature=0.0, stop=(stop,)),
            on_text=None,
            cancelled=threading.Event(),
        )
        assert stop not in cut.text and cut.finish_reason == "stop"
    with pytest.raises(BadRequest, match="context is 64 tokens"):
        model.generate("word " * 200, params, on_text=None, cancelled=threading.Event())
    empty = model.generate(
        "", GenerationParams(max_tokens=3, temperature=0.0), on_text=None, cancelled=threading.Event()
    )
    assert empty.prompt_tokens == 1  # started from BOS/EOS
    # Room left in the context bounds the generation, whatever max_tokens says.
    long_prompt = model.generate(
        "hello " * 30, GenerationParams(max_tokens=1000, temperature=0.0), on_text=None, cancelled=threading.Event()
    )
    assert long_prompt.prompt_tokens + long_prompt.completion_tokens <= LM_CONTEXT


def test_model_folder_is_found_inside_mlflow_style_downloads(tmp_path: Path, classifier_dir: Path) -> None:
    from airflow_llmops.serving.errors import ModelLoadError
    from airflow_llmops.serving.sources import find_model_dir, resolve_source

    # Our registered artifact: a folder `model/` holding the Hugging Face files.
    ours = tmp_path / "ours"
    shutil.copytree(classifier_dir, ours / "model")
    assert resolve_source(str(ours)).path == ours / "model"
    # mlflow.transformers: weights in model/, tokenizer in components/tokenizer/.
    flavour = tmp_path / "flavour"
    (flavour / "model").mkdir(parents=True)
    shutil.copy(classifier_dir / "config.json", flavour / "model" / "config.json")
    shutil.copytree(
        classifier_dir,
        flavour / "components" / "tokenizer",
        ignore=shutil.ignore_patterns("config.json", "*.safetensors"),
    )
    folder = resolve_source(str(flavour))
    assert folder.path == flavour / "model"
    assert folder.tokenizer_path == flavour / "components" / "tokenizer"
    with pytest.raises(ModelLoadError, match="no model folder"):
        find_model_dir(tmp_path / "flavour" / "components")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(str(tmp_path / "missing"))


def test_quantized_marker_selects_the_quantized_loader_and_loaders_can_be_added(tmp_path: Path) -> None:
    from airflow_llmops.serving.errors import ModelLoadError
    from airflow_llmops.serving.models import EchoModel, Loader, load_model, register_loader
    from airflow_llmops.serving.sources import resolve_source

    folder = tmp_path / "q"
    folder.mkdir()
    (folder / "quantization.json").write_text(json.dumps({"task": "causal_lm", "method": "int8"}))
    with pytest.raises(ModelLoadError, match="quantized 'causal_lm'"):
        load_model(resolve_source(str(folder)))
    register_loader(Loader("test-int8-lm", lambda f: (f.path / "quantization.json").is_file(), lambda f: EchoModel()))
    try:
        assert isinstance(load_model(resolve_source(str(folder))), EchoModel)
    finally:
        from airflow_llmops.serving import models

        models._LOADERS[:] = [x for x in models._LOADERS if x.name != "test-int8-lm"]


def test_models_uri_from_an_mlflow_registry_resolves_to_the_hf_folder(tmp_path: Path, classifier_dir: Path) -> None:
    mlflow = require_module("mlflow")
    from airflow_llmops.serving.sources import resolve_source

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment("serving-test")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(classifier_dir), artifact_path="model")
    client = mlflow.MlflowClient()
    client.create_registered_model("clf")
    version = client.create_model_version("clf", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("clf", "champion", version.version)
    for source in ("models:/clf@champion", f"models:/clf/{version.version}"):
        folder = resolve_source(source, cache=tmp_path / "cache")
        assert (folder.path / "config.json").is_file(), folder
        assert json.loads((folder.path / "config.json").read_text())["id2label"]["0"] == "greetings"
