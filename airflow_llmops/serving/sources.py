"""Turn a variant's model source (path, ``file://``, ``models:/``, any MLflow artifact URI) into a local folder."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from airflow_llmops.serving.errors import ModelLoadError

ECHO_SOURCE = "echo://"
# Files that mark a folder a loader can read (a Hugging Face save, or a quantized artifact).
MODEL_MARKERS = ("config.json", "quantization.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
_SEARCH_DEPTH = 3
_SEARCH_MAX_DIRS = 200


@dataclass(frozen=True)
class ModelFolder:
    """A model on local disk: ``path`` holds the weights and config, ``tokenizer_path`` the tokenizer."""

    source: str
    path: Path
    tokenizer_path: Path


def _default_cache() -> Path:
    return Path(tempfile.gettempdir()) / "llmops-model-cache"


def _download(source: str, cache: Path | None) -> Path:
    """Fetch a remote source through MLflow (registry URIs, ``runs:/``, ``s3://``, ...) into the cache."""
    try:
        import mlflow.artifacts
    except ImportError as err:
        raise ModelLoadError(
            f"model source {source!r} needs mlflow to download it; install the extra `mlflow`"
        ) from err
    # models:/NAME@ALIAS moves when the alias does: download afresh each time (a new folder per call).
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    root = cache or _default_cache()
    root.mkdir(parents=True, exist_ok=True)
    dst = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=root))
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst)))
    except Exception as err:  # MLflow raises many types (MlflowException, OSError, botocore errors)
        raise ModelLoadError(
            f"cannot download model source {source!r} with MLflow ({type(err).__name__}: {err}); check the "
            "registered name and alias/version, and MLFLOW_TRACKING_URI"
        ) from None


def _local(source: str) -> Path | None:
    if source.startswith("file://"):
        return Path(unquote(urlparse(source).path))
    if "://" in source or source.startswith(("models:/", "runs:/")):
        return None
    from airflow_llmops.ml.models import resolve_model_path

    return Path(os.path.expanduser(resolve_model_path(source)))


def _is_model_dir(path: Path) -> bool:
    try:
        return any((path / marker).is_file() for marker in MODEL_MARKERS)
    except OSError:
        return False


def _subdirs(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:  # unreadable: not where a model is
        return []


def find_model_dir(root: Path) -> Path:
    """The folder under ``root`` (itself, or one level or more down) that holds the model.

    MLflow downloads wrap the Hugging Face files: ``model/`` (our registered artifact), or
    ``model/`` + ``components/tokenizer/`` (``mlflow.transformers``).
    """
    if _is_model_dir(root):
        return root
    found: list[Path] = []
    frontier = [root]
    for _ in range(_SEARCH_DEPTH):
        frontier = sorted(p for d in frontier for p in _subdirs(d))
        if len(frontier) > _SEARCH_MAX_DIRS:  # a source of "/" or a home folder: not a model download
            raise ModelLoadError(f"{root} holds too many folders to be a model download; point at the model folder")
        found = [p for p in frontier if _is_model_dir(p)]
        if found:
            break
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelLoadError(
            f"no model folder under {root}: expected a folder with one of {list(MODEL_MARKERS)} (a Hugging Face "
            "save_pretrained folder or a quantized artifact)"
        )
    raise ModelLoadError(f"several model folders under {root}: {[str(p) for p in found]}; point at one of them")


def _tokenizer_dir(model_dir: Path, root: Path) -> Path:
    if any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        return model_dir
    for candidate in (root / "components" / "tokenizer", model_dir.parent / "components" / "tokenizer"):
        if candidate.is_dir():
            return candidate
    return model_dir


def resolve_source(source: str, *, cache: Path | None = None) -> ModelFolder:
    """Where ``source`` is on local disk, downloading it first when it is remote."""
    if source == ECHO_SOURCE:
        return ModelFolder(source=source, path=Path(), tokenizer_path=Path())
    local = _local(source)
    root = _download(source, cache) if local is None else local
    if not root.is_dir():
        raise ModelLoadError(
            f"model source {source!r} is not a folder ({root} does not exist); give a save_pretrained folder, "
            "file://PATH, models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    model_dir = find_model_dir(root)
    return ModelFolder(source=source, path=model_dir, tokenizer_path=_tokenizer_dir(model_dir, root))
