"""Where the final model goes: ``output_uri`` (a local folder, ``file://``, or a remote object-store URI),
else ``<job dir>/model``.

A remote target is written locally first and uploaded once complete, so a reader of the remote URI never sees a
half-written model; the destination's scheme is checked before training, not after an hour of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from airflow_llmops.ml.training.data import local_path
from airflow_llmops.ml.training.errors import TrainingInputError


@dataclass(frozen=True)
class OutputTarget:
    local: Path
    remote: str | None = None

    def publish(self) -> str:
        """Upload to the remote URI where there is one; returns the model's URI."""
        if self.remote is None:
            return str(self.local)
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.remote)
        fs.put(f"{self.local}/", root.rstrip("/") + "/", recursive=True)
        return self.remote


def resolve_output(output_uri: str | None, default: Path) -> OutputTarget:
    if not output_uri:
        return OutputTarget(default.resolve())
    path = local_path(output_uri)
    if path is not None:
        return OutputTarget(Path(path).resolve())
    scheme = output_uri.split("://", 1)[0]
    try:
        import fsspec

        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as err:
        raise TrainingInputError(
            f"output_uri {output_uri!r}: no filesystem for scheme {scheme!r} ({err}); install its fsspec "
            "implementation (s3fs, gcsfs, adlfs) or write to a local folder"
        ) from None
    return OutputTarget(default.resolve(), output_uri)
