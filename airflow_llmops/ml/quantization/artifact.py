"""What a quantized model folder holds: its metadata file, its weight files and their size on disk."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from airflow_llmops.ml.quantization.errors import QuantizationInputError

METADATA_FILE = "quantization.json"
FORMAT_VERSION = 1
DEFAULT_MAX_LENGTH = 128  # tokens per text, for measuring, calibrating and serving
Task = Literal["classification", "causal_lm"]
# Weight files of a plain Hugging Face folder (the fp32 model) and of our artifacts.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx", ".onnx.data")


@dataclass(frozen=True)
class QuantizedArtifact:
    """A quantized model saved on disk; ``path`` loads back with :func:`load_quantized`.

    :param path: the artifact folder (metadata, weights, config and tokenizer).
    :param method: the quantization method, one of ``QuantMethod``.
    :param task: ``classification`` or ``causal_lm``.
    :param source_model: the full-precision model folder it was made from.
    :param size_bytes: bytes of the weight files (tokenizer and config excluded), comparable with
        :func:`weights_size` of the source folder.
    :param weights: weight file names inside ``path``.
    :param quantize_s: seconds the quantization (and export) took.
    :param libraries: versions of the libraries that produced it; loading needs compatible ones.
    :param options: method options the loader replays (e.g. whether embeddings are quantized).
    """

    path: str
    method: str
    task: Task
    source_model: str
    size_bytes: int
    weights: list[str]
    quantize_s: float
    libraries: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, folder: str | Path | None = None) -> None:
        """Write ``quantization.json`` into ``folder`` (default: ``path``)."""
        target = Path(folder or self.path) / METADATA_FILE
        target.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, folder: str | Path) -> QuantizedArtifact:
        path = local_path(folder)
        meta = path / METADATA_FILE
        if not meta.is_file():
            raise QuantizationInputError(
                f"{path} is not a quantized model folder: it has no {METADATA_FILE}; give a folder written by "
                "quantize_model, or load a full-precision model with load_fp32"
            )
        data = json.loads(meta.read_text(encoding="utf-8"))
        if data.get("format_version") != FORMAT_VERSION:
            raise QuantizationInputError(
                f"{meta} has format_version {data.get('format_version')!r}; this version reads {FORMAT_VERSION}: "
                "quantize the model again"
            )
        data["path"] = str(path)  # the folder may have moved since it was written
        return cls(**data)


def local_path(value: str | Path) -> Path:
    return Path(str(value).removeprefix("file://")).expanduser()


def model_folder(value: str | Path) -> Path:
    """An existing Hugging Face model folder (config.json present), else an input error naming it."""
    path = local_path(value)
    if not path.is_dir():
        raise QuantizationInputError(f"model folder {path} does not exist; give the folder of a saved model")
    if not (path / "config.json").is_file():
        raise QuantizationInputError(
            f"model folder {path} has no config.json; give a folder written by save_pretrained (the training "
            "job's model/ folder)"
        )
    return path


def detect_task(config: Any) -> Task:
    """``classification`` for ``*ForSequenceClassification``, ``causal_lm`` for ``*ForCausalLM``/``*LMHeadModel``."""
    from airflow_llmops.ml.predict import model_kind

    architectures = list(getattr(config, "architectures", None) or [])
    kind = model_kind(config)  # the one rule (causal LM first; see airflow_llmops.ml.predict)
    if kind is not None:
        return kind
    raise QuantizationInputError(
        f"model architectures {architectures} are neither a sequence classifier nor a causal LM; quantization "
        "supports *ForSequenceClassification and *ForCausalLM models"
    )


def weights_size(folder: str | Path, names: list[str] | None = None) -> int:
    """Bytes of the weight files in ``folder`` (all of them, or ``names``)."""
    path = local_path(folder)
    files = [path / n for n in names] if names is not None else [p for p in path.iterdir() if _is_weights(p)]
    return sum(f.stat().st_size for f in files if f.is_file())


def _is_weights(path: Path) -> bool:
    return path.is_file() and path.name.endswith(_WEIGHT_SUFFIXES)


def library_versions(*names: str) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", *names):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
