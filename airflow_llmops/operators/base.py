"""Shared base of our operators: platform choice, artifact store location, staging and deterministic job names.

Staging: the ML core, the training entry point and the libraries it calls (pandas, transformers, MLflow) read
local paths and hold no cloud credentials. :func:`stage_in` turns an artifact URI into a local path, downloading
a remote one (``s3://``, ``gs://``, ``abfs://``...) through the Airflow connection; :func:`stage_out` and
:func:`staged_output` put what a stage wrote back on the artifact store the same way. Every stage uses them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, ObjectStoragePath, conf
from airflow.sdk.exceptions import AirflowFailException

from airflow_llmops.platforms.base import PLATFORM_NAMES, job_name_for
from airflow_llmops.uris import display_uri

if TYPE_CHECKING:
    from airflow.sdk import Context

_RUN_SAFE = re.compile(r"[^A-Za-z0-9_.=-]+")
_LOCAL_PROTOCOLS = ("file", "local")
# A staged copy nobody has used for this long is removed by the next stage_in on that machine.
STAGING_MAX_AGE_S = 24 * 3600
_STAGED_MARKER = ".llmops-staged.json"
_COPY_BUFFER = 8 * 1024 * 1024
# Fields of an object's listing entry that change with its content, by store: S3 and Azure ETags, GCS generation.
_VERSION_FIELDS = ("ETag", "etag", "generation", "md5Hash", "LastModified", "last_modified", "mtime", "updated")


def airflow_home() -> str:
    """Absolute ``[core] airflow_home`` (``$AIRFLOW_HOME``, default ``~/airflow``)."""
    home = conf.get("core", "airflow_home", fallback="") or os.environ.get("AIRFLOW_HOME", "~/airflow")
    return os.path.abspath(os.path.expanduser(home))


def default_artifact_root() -> str:
    """``[llmops] artifact_root``, else ``$LLMOPS_ARTIFACT_ROOT``, else ``$AIRFLOW_HOME/llmops/artifacts``."""
    configured = conf.get("llmops", "artifact_root", fallback="") or os.environ.get("LLMOPS_ARTIFACT_ROOT", "")
    if configured:
        return configured
    return f"file://{os.path.join(airflow_home(), 'llmops', 'artifacts')}"


def default_staging_root() -> Path:
    """``[llmops] staging_root``, else ``$AIRFLOW_HOME/llmops/staging``: this machine's copies of remote inputs."""
    configured = conf.get("llmops", "staging_root", fallback="")
    return (
        Path(os.path.expanduser(configured.removeprefix("file://")))
        if configured
        else Path(airflow_home(), "llmops", "staging")
    )


def as_storage_path(uri: str, conn_id: str | None = None) -> ObjectStoragePath:
    """An Airflow ObjectStoragePath for a URI or a plain absolute path."""
    if "://" not in uri:
        uri = f"file://{os.path.abspath(uri)}"
    if conn_id and not uri.startswith("file://"):
        return ObjectStoragePath(uri, conn_id=conn_id)
    return ObjectStoragePath(uri)


def is_remote(uri: str | None) -> bool:
    """True for an object-store URI (``s3://``, ``gs://``, ``abfs://``...): one a local process cannot open.
    ``file://`` URIs, plain paths and registry URIs (``models:/``, ``runs:/``) are not."""
    if not uri or "://" not in uri:
        return False
    return uri.split("://", 1)[0].lower() not in _LOCAL_PROTOCOLS


def _copy_file(source: Path, dest: ObjectStoragePath) -> None:
    with source.open("rb") as src, dest.open("wb") as out:  # type: ignore[no-untyped-call]
        shutil.copyfileobj(src, out, _COPY_BUFFER)


def upload_tree(local: Path, target: ObjectStoragePath) -> None:
    """Copy a local folder to an object-store path, file by file (streamed, through the path's connection)."""
    for file in sorted(local.rglob("*")):
        if file.is_file():
            dest = target / file.relative_to(local).as_posix()
            dest.parent.mkdir(parents=True, exist_ok=True)
            _copy_file(file, dest)


def local_folder(path: ObjectStoragePath) -> Path | None:
    """The local filesystem path of a ``file://`` storage path; None for a remote one."""
    if path.protocol not in _LOCAL_PROTOCOLS:
        return None
    return Path(path.path)


def _listing(source: ObjectStoragePath) -> dict[str, dict[str, Any]]:
    """{path relative to ``source``'s parent: listing entry} of a remote file or folder, read fresh from the store:
    a file ``.../x.parquet`` lists as ``x.parquet``, the files of a folder ``.../data`` as ``data/...``."""
    fs, root = source.fs, source.path.rstrip("/")
    name = root.rsplit("/", 1)[-1]
    with contextlib.suppress(Exception):  # some filesystems cache listings; not every one can drop them
        fs.invalidate_cache(root)
    try:
        found: dict[str, dict[str, Any]] = fs.find(root, detail=True)
    except FileNotFoundError:
        found = {}
    if list(found) == [root] or (not found and fs.isfile(root)):
        return {name: found.get(root) or fs.info(root)}
    prefix = root + "/"
    return {f"{name}/{key[len(prefix) :]}": info for key, info in found.items() if key.startswith(prefix)}


def _fingerprint(uri: str, files: dict[str, dict[str, Any]]) -> str:
    digest = hashlib.sha256(uri.encode())
    for rel in sorted(files):
        info = files[rel]
        version = next((str(info[k]) for k in _VERSION_FIELDS if info.get(k) not in (None, "")), "")
        digest.update(f"\n{rel}\t{info.get('size')}\t{version}".encode())
    return digest.hexdigest()[:20]


def _prune_staging(root: Path, keep: Path, max_age: float) -> None:
    """Remove staged copies (and leftovers of killed downloads) unused for ``max_age`` seconds; best effort."""
    cutoff = time.time() - max_age
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            if entry == keep or not entry.is_dir():
                continue
            stamp = entry if entry.name.startswith(".") else entry / _STAGED_MARKER
            with contextlib.suppress(OSError):
                if stamp.stat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)


def stage_in(
    uri: str,
    conn_id: str | None = None,
    *,
    cache_root: str | Path | None = None,
    max_age: float = STAGING_MAX_AGE_S,
) -> Path:
    """A local path holding what ``uri`` names (a folder, or a single file), for code that reads local paths.
    A remote ``.tar.gz`` file (SageMaker's ``model.tar.gz``) is unpacked: the path is the folder it holds.

    A local URI (``file://`` or a plain path) is returned as its path: nothing is copied. A remote one is downloaded
    through Airflow's object storage with ``conn_id`` (the reading process needs no cloud credentials of its own)
    into ``<cache_root>/<name>-<digest>``, where the digest covers the URI and the remote listing (names, sizes,
    ETags or generations): a later call for unchanged content reuses the copy, changed content gets a new one. A
    copy appears complete or not at all (downloaded beside it, then renamed), so concurrent tasks on one machine
    can stage the same input. Copies unused for ``max_age`` seconds are removed by later calls.

    :param cache_root: default :func:`default_staging_root` (``[llmops] staging_root``).
    :raises FileNotFoundError: nothing exists at a remote ``uri``.
    """
    uri = str(uri)
    if not is_remote(uri):
        local = local_folder(as_storage_path(uri))
        assert local is not None
        return local
    plain = display_uri(uri)
    if plain != uri:  # the URI names its own connection (s3://conn_id@bucket/...): that one reaches it
        conn_id = ObjectStoragePath(uri).conn_id
    source = as_storage_path(plain, conn_id)
    files = _listing(source)
    if not files:
        via = f" through connection {conn_id!r}" if conn_id else " (no connection: the default credentials)"
        raise FileNotFoundError(f"{plain} holds no file{via}")
    root = Path(cache_root) if cache_root is not None else default_staging_root()
    root.mkdir(parents=True, exist_ok=True)
    base = source.path.rstrip("/")
    name = base.rsplit("/", 1)[-1]
    entry = root / f"{_RUN_SAFE.sub('_', name)[:60]}-{_fingerprint(plain, files)}"
    # The copy keeps the remote name (<entry>/x.parquet, <entry>/data/...); the marker stays outside it.
    target, marker = entry / name.removesuffix(".tar.gz"), entry / _STAGED_MARKER
    if marker.is_file():
        with contextlib.suppress(OSError):  # the use keeps it from being pruned
            os.utime(marker)
        return target
    _prune_staging(root, entry, max_age)
    partial = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
    try:
        fs, parent = source.fs, (base.rsplit("/", 1)[0] + "/" if "/" in base else "")
        total = 0
        for rel, info in files.items():
            dest = partial / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(parent + rel, str(dest))
            size = dest.stat().st_size
            if info.get("size") is not None and int(info["size"]) != size:
                raise OSError(
                    f"{plain}: {rel} changed while it was downloaded ({info['size']} bytes listed, {size} read)"
                )
            total += size
        if len(files) == 1 and name.endswith(".tar.gz"):
            # A packed model (SageMaker's model.tar.gz): readers get the folder it holds.
            _unpack(partial / name, partial / name.removesuffix(".tar.gz"))
        record = {"uri": plain, "conn_id": conn_id, "files": len(files), "bytes": total, "staged_at": time.time()}
        (partial / _STAGED_MARKER).write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.rename(partial, entry)
        except OSError:
            if not marker.is_file():  # not a concurrent stager that won the race: a real failure
                raise
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def _unpack(archive: Path, dest: Path) -> None:
    """Extract a gzipped tar into ``dest`` (members that would land outside it are refused), then drop it."""
    import tarfile

    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(dest, filter="data")
    archive.unlink()


def stage_out(local: Path, target: ObjectStoragePath) -> None:
    """Publish the folder ``local`` at ``target``: uploaded through the target's connection, or copied to another
    local folder; nothing to do when ``local`` already is ``target``."""
    dest = local_folder(target)
    if dest is not None and dest.resolve() == local.resolve():
        return
    upload_tree(local, target)


@contextlib.contextmanager
def staged_output(target: ObjectStoragePath, *, prefix: str = "llmops-out-") -> Iterator[Path]:
    """A local folder for what belongs at ``target``: ``target`` itself when it is local, else a temporary folder
    that is uploaded to ``target`` (:func:`stage_out`) when the block succeeds and removed in any case."""
    local = local_folder(target)
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)
        yield local
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)
        stage_out(Path(tmp), target)


#: Settings of a cloud platform that ``[llmops] <platform>_<name>`` may give when an operator does not.
_CLOUD_DEFAULTS = {
    "sagemaker": ("role_arn", "image_uri", "s3_prefix"),
    "vertex": ("project", "region", "image_uri", "staging_uri", "request_response_logging_uri"),
    "azureml": (
        "subscription_id",
        "resource_group",
        "workspace_name",
        "compute",
        "image",
        "environment",
        "output_uri",
        "instance_type",
    ),
}
_CONN_KEYS = {"sagemaker": "aws_conn_id", "vertex": "gcp_conn_id", "azureml": "azure_conn_id"}


def cloud_platform_kwargs(
    platform: str,
    conn_id: str | None,
    options: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The adapter's keyword arguments for a cloud platform: the connection, ``[llmops] <platform>_*`` defaults,
    then the operator's ``platform_options`` (which win); ``env`` joins the options' own ``env``. JSON values only:
    credentials stay in the connection."""
    out: dict[str, Any] = {}
    if platform in _CONN_KEYS and conn_id:
        out[_CONN_KEYS[platform]] = conn_id
    for name in _CLOUD_DEFAULTS.get(platform, ()):
        value = conf.get("llmops", f"{platform}_{name}", fallback="")
        if value:
            out[name] = value
    options = dict(options or {})
    merged_env = {**dict(env or {}), **dict(options.pop("env", None) or {})}
    out.update(options)
    if merged_env:
        out["env"] = merged_env
    return out


class LLMOpsBaseOperator(BaseOperator):
    """Base of every airflow-llmops operator.

    :param platform: ``local``, ``sagemaker``, ``vertex`` or ``azureml`` (templated).
    :param platform_conn_id: Airflow connection holding the platform's credentials; ``None`` for its default.
    :param artifact_root: where this task writes models, datasets and reports (templated); defaults to
        ``[llmops] artifact_root``.
    :param artifact_conn_id: connection for a remote ``artifact_root`` (``[llmops] artifact_conn_id``); inputs
        on a remote store (datasets, models) are read through it too.
    """

    template_fields: Sequence[str] = ("platform", "artifact_root")

    def __init__(
        self,
        *,
        platform: str = "local",
        platform_conn_id: str | None = None,
        artifact_root: str | None = None,
        artifact_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.platform = platform
        self.platform_conn_id = platform_conn_id
        self.artifact_root = artifact_root
        self.artifact_conn_id = artifact_conn_id

    def check_platform(self) -> str:
        if self.platform not in PLATFORM_NAMES:
            raise ValueError(
                f"{self.task_id}: unknown platform {self.platform!r}; use one of {', '.join(PLATFORM_NAMES)}"
            )
        return self.platform

    def artifact_connection(self) -> str | None:
        """The connection that reaches the artifact store: ``artifact_conn_id``, else ``[llmops] artifact_conn_id``."""
        return self.artifact_conn_id or conf.get("llmops", "artifact_conn_id", fallback="") or None

    def artifact_base(self) -> ObjectStoragePath:
        root = self.artifact_root or default_artifact_root()
        return as_storage_path(root, self.artifact_connection())

    def run_folder(self, context: Context) -> ObjectStoragePath:
        """``<artifact_root>/<dag_id>/<run_id>``: everything one DAG run produces, stable across retries."""
        dag_id = context["dag"].dag_id
        run_id = _RUN_SAFE.sub("_", context["run_id"])
        return self.artifact_base() / dag_id / run_id

    def job_name(self, context: Context) -> str:
        return job_name_for(context["dag"].dag_id, context["run_id"], self.task_id)

    def stage_in(self, uri: str, what: str = "input") -> Path:
        """:func:`stage_in` through :meth:`artifact_connection`; a remote input that is not there fails the task
        (no retry), naming the URI and the connection. A local path is returned as is, checked by its reader."""
        conn_id = self.artifact_connection()
        try:
            local = stage_in(str(uri), conn_id)
        except FileNotFoundError as err:
            raise AirflowFailException(f"{self.task_id}: cannot read the {what}: {err}") from None
        if is_remote(str(uri)):
            self.log.info("Staged %s %s at %s", what, display_uri(uri), local)
        return local
