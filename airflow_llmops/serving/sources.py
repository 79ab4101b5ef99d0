"""Turn a variant's model source (path, ``file://``, ``models:/``, any MLflow artifact URI) into a local folder.

Remote sources are downloaded into a model cache: one entry per model version, reused by later loads and restarts,
deleted by :class:`ModelCache` once no variant uses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from airflow_llmops.serving.errors import ModelLoadError

log = logging.getLogger(__name__)
ECHO_SOURCE = "echo://"
# Files that mark a folder a loader can read (a Hugging Face save, or a quantized artifact).
MODEL_MARKERS = ("config.json", "quantization.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
_SEARCH_DEPTH = 3
_SEARCH_MAX_DIRS = 200
_MODEL_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)/?$")
_MODEL_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)/?$")
MARKER = ".llmops-download.json"  # written last, before the rename into place: an entry without it is incomplete
_PARTIAL = ".partial-"
_KEY_CHARS = 16


@dataclass(frozen=True)
class ModelFolder:
    """A model on local disk: ``path`` holds the weights and config, ``tokenizer_path`` the tokenizer;
    ``download`` is the model-cache entry it was downloaded into (``None`` for a local folder)."""

    source: str
    path: Path
    tokenizer_path: Path
    download: Path | None = None


def _default_cache() -> Path:
    return Path(tempfile.gettempdir()) / "llmops-model-cache"


def pinned_uri(source: str) -> str | None:
    """The immutable URI ``source`` stands for now, or ``None`` when its content may change under the same URI.

    ``models:/NAME@ALIAS`` moves when the alias does, so it is resolved to ``models:/NAME/VERSION`` through the
    registry; a version and ``runs:/`` never change. Stages, ``latest`` and storage URIs (``s3://``...) may.
    """
    if _MODEL_VERSION.match(source) or source.startswith("runs:/"):
        return source.rstrip("/")
    alias = _MODEL_ALIAS.match(source)
    if alias is None:
        return None
    try:
        from mlflow import MlflowClient

        version = MlflowClient().get_model_version_by_alias(alias["name"], alias["alias"]).version
    except Exception as err:  # MLflow raises many types (MlflowException, OSError, HTTP errors)
        raise ModelLoadError(
            f"cannot resolve {source!r} in the MLflow registry ({type(err).__name__}: {err}); check the registered "
            "name and alias, and MLFLOW_TRACKING_URI"
        ) from None
    return f"models:/{alias['name']}/{version}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def clean_partials(root: Path, *, pid: int | None = None) -> None:
    """Delete downloads cut short (``.partial-<key>-<pid>-*``): of ``pid``, or of every process that is gone."""
    with contextlib.suppress(OSError):
        for path in root.glob(f"{_PARTIAL}*"):
            owner = path.name.removeprefix(_PARTIAL).split("-")[1:2]
            known = bool(owner) and owner[0].isdigit()
            if (pid is not None and known and int(owner[0]) == pid) or (
                pid is None and (not known or not _pid_alive(int(owner[0])))
            ):
                shutil.rmtree(path, ignore_errors=True)


def is_reusable(entry: Path) -> bool:
    """Entries of immutable sources are named by the hash alone; the others carry a random suffix."""
    return len(entry.name) == _KEY_CHARS


def download(source: str, root: Path) -> Path:
    """The cache entry (a folder under ``root``) holding ``source``, downloaded through MLflow when needed.

    An immutable source (see :func:`pinned_uri`) lives in ``root/<hash of the pinned URI>`` and is reused by every
    later load of it, restarts included; another source gets a fresh ``root/<hash>-<random>`` each time. Downloads
    go to a ``.partial-*`` folder renamed into place once complete, so a crash never leaves a half entry behind.
    """
    try:
        import mlflow.artifacts
    except ImportError as err:
        raise ModelLoadError(
            f"model source {source!r} needs mlflow to download it; install the extra `mlflow`"
        ) from err
    pinned = pinned_uri(source)
    key = hashlib.sha256((pinned or source).encode()).hexdigest()[:_KEY_CHARS]
    root.mkdir(parents=True, exist_ok=True)
    entry = root / key if pinned is not None else root / f"{key}-{uuid.uuid4().hex[:8]}"
    if (entry / MARKER).is_file():
        log.info("model source %s: reusing %s", source, entry)
        return entry
    partial = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL}{key}-{os.getpid()}-", dir=root))
    try:
        fetched = Path(mlflow.artifacts.download_artifacts(artifact_uri=pinned or source, dst_path=str(partial)))
        inner = str(fetched.relative_to(partial)) if fetched.is_relative_to(partial) else "."
        meta = {"source": source, "pinned": pinned, "path": inner, "downloaded_at": time.time()}
        (partial / MARKER).write_text(json.dumps(meta) + "\n", encoding="utf-8")
        try:
            os.rename(partial, entry)
        except OSError:  # another load of the same version finished first: use that one
            if not (entry / MARKER).is_file():
                raise
            shutil.rmtree(partial, ignore_errors=True)
    except Exception as err:  # MLflow raises many types (MlflowException, OSError, botocore errors)
        shutil.rmtree(partial, ignore_errors=True)
        raise ModelLoadError(
            f"cannot download model source {source!r} with MLflow ({type(err).__name__}: {err}); check the "
            "registered name and alias/version, and MLFLOW_TRACKING_URI"
        ) from None
    log.info("model source %s: downloaded to %s", source, entry)
    return entry


def entry_root(entry: Path) -> Path:
    """The downloaded folder inside a cache entry (MLflow may nest it, e.g. ``<entry>/model``)."""
    try:
        inner = str(json.loads((entry / MARKER).read_text(encoding="utf-8")).get("path", "."))
    except (OSError, ValueError, AttributeError):
        return entry
    path = (entry / inner).resolve()
    return path if path.is_dir() and path.is_relative_to(entry.resolve()) else entry


class ModelCache:
    """The server's model cache folder: entries shared by variants, deleted when the last one goes.

    :param root: ``--model-cache``: entries of immutable sources stay there across restarts (a restarted server
        loads from disk instead of downloading again). ``None``: a private temporary folder, deleted by
        :meth:`close`.
    """

    def __init__(self, root: Path | None) -> None:
        self.private = root is None
        self.root = Path(tempfile.mkdtemp(prefix="llmops-models-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        clean_partials(self.root)  # left by a server that was killed mid-download

    def owns(self, entry: Path | None) -> bool:
        return entry is not None and entry.parent.resolve() == self.root.resolve()

    def release(self, entry: Path | None, in_use: Iterable[Path | None]) -> bool:
        """Delete ``entry`` unless a variant in ``in_use`` still loads from it; True when deleted."""
        if not self.owns(entry) or entry in set(in_use):
            return False
        assert entry is not None
        shutil.rmtree(entry, ignore_errors=True)
        log.info("model cache: deleted %s (no variant uses it any more)", entry)
        return True

    def close(self, in_use: Iterable[Path | None]) -> None:
        """At shutdown: the private folder goes; in ``--model-cache``, entries that are never reused go."""
        if self.private:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        clean_partials(self.root, pid=os.getpid())
        for entry in in_use:
            if entry is not None and self.owns(entry) and not is_reusable(entry):
                shutil.rmtree(entry, ignore_errors=True)


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
    """Where ``source`` is on local disk, downloading it into ``cache`` first when it is remote (see
    :func:`download`); ``ModelFolder.download`` is then the cache entry, which the caller deletes when done."""
    if source == ECHO_SOURCE:
        return ModelFolder(source=source, path=Path(), tokenizer_path=Path())
    local = _local(source)
    if local is not None:
        return _model_folder(source, local, None)
    entry = download(source, cache or _default_cache())
    try:
        return _model_folder(source, entry_root(entry), entry)
    except ModelLoadError:
        if not is_reusable(entry):  # nothing will ever load it again
            shutil.rmtree(entry, ignore_errors=True)
        raise


def _model_folder(source: str, root: Path, entry: Path | None) -> ModelFolder:
    if not root.is_dir():
        raise ModelLoadError(
            f"model source {source!r} is not a folder ({root} does not exist); give a save_pretrained folder, "
            "file://PATH, models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    model_dir = find_model_dir(root)
    return ModelFolder(source, model_dir, _tokenizer_dir(model_dir, root), download=entry)
