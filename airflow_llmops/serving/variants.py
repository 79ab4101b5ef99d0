"""The variants a server holds, their loading, and the router that picks one per request by weight.

All methods run on the event loop (one thread), so the registry needs no lock; model work goes to each variant's
single worker thread, which serialises its forward passes.

The state file holds the variants, the "fallback" weights (what to serve if the server restarts mid-rollout) and
the boot counter::

    {"version": 1,
     "variants": [{"name": "blue", "source": "...", "weight": 90.0}, {"name": "green", ..., "weight": 10.0}],
     "fallback": {"weights": {"blue": 100.0, "green": 0.0}, "set_at": 1767225600.0},
     "boot": {"count": 2, "started_at": 1767225700.0, "fallback_applied_at": 1767225700.0}}
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from airflow_llmops.serving.batching import Batcher
from airflow_llmops.serving.config import ServerConfig, VariantSpec
from airflow_llmops.serving.errors import (
    BadRequest,
    Conflict,
    FaultInjectionDisabled,
    ModelLoadError,
    NotFound,
    Unavailable,
)
from airflow_llmops.serving.models import Classification, ServedModel, Task, load_model
from airflow_llmops.serving.schemas import UpdateVariantRequest, VariantInfo
from airflow_llmops.serving.sources import ModelCache, ModelFolder, resolve_source
from airflow_llmops.serving.telemetry import Telemetry

log = logging.getLogger(__name__)
STATE_VERSION = 1


@dataclass
class Variant:
    spec: VariantSpec
    status: str = "loading"
    model: ServedModel | None = None
    error: str | None = None
    loaded_at: float | None = None
    executor: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(max_workers=1)
    )
    classifier: Batcher[list[str], list[Classification]] | None = None
    download: Path | None = None  # its model-cache entry, deleted when no variant uses it any more
    redact_output: Callable[[Mapping[str, int]], None] | None = None  # set: redact its output, count here

    @property
    def name(self) -> str:
        return self.spec.name

    def serves(self, task: Task) -> bool:
        return self.status == "ready" and self.model is not None and task in self.model.tasks


class VariantRegistry:
    """Holds the variants, routes requests to them, and keeps the state file in step with every change."""

    def __init__(self, config: ServerConfig, telemetry: Telemetry) -> None:
        self.config = config
        self.telemetry = telemetry
        self.variants: dict[str, Variant] = {}
        self._loads: set[asyncio.Task[None]] = set()
        self._initial: list[asyncio.Task[None]] = []
        self.cache: ModelCache | None = None  # made in start(): a private one is a temporary folder
        self.started_at = time.time()
        self.boot_count = 1
        self.fallback: dict[str, float] | None = None
        self.fallback_set_at: float | None = None
        self.fallback_applied_at: float | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def _read_state(self) -> dict[str, object]:
        path = self.config.state_file
        if path is None or not path.is_file():
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}

    def initial_specs(self) -> list[VariantSpec]:
        """The state file's variants when it exists (a restart comes back as it was), else the configured ones."""
        return self._initial_specs(self._read_state())

    def _initial_specs(self, data: Mapping[str, object]) -> list[VariantSpec]:
        raw = data.get("variants")
        if data:
            specs = [VariantSpec.model_validate(v) for v in raw] if isinstance(raw, list) else []
        else:
            specs = list(self.config.variants)
        if not self.config.enable_fault_injection and any(s.fault is not None for s in specs):
            # A state file written by a test server must not bring failures into a server started without the flag.
            faulty = [s.name for s in specs if s.fault is not None]
            log.warning("dropping the failure injection of %s: fault injection is disabled", faulty)
            specs = [s.model_copy(update={"fault": None}) for s in specs]
        return specs

    def _restore(self, data: Mapping[str, object], specs: list[VariantSpec]) -> list[VariantSpec]:
        """Count this boot and, when the state holds fallback weights, start with them ("old weights first"):
        a server that died mid-rollout comes back on the weights the rollout declared safe, not on a canary step."""
        boot = data.get("boot")
        previous = boot.get("count") if isinstance(boot, dict) else None
        self.boot_count = (int(previous) if isinstance(previous, (int, float)) else int(bool(data))) + 1
        fallback = data.get("fallback")
        weights = fallback.get("weights") if isinstance(fallback, dict) else None
        if not isinstance(weights, dict) or not weights:
            return specs
        assert isinstance(fallback, dict)
        self.fallback = {str(k): float(v) for k, v in weights.items()}
        set_at = fallback.get("set_at")
        self.fallback_set_at = float(set_at) if isinstance(set_at, (int, float)) else None
        by_name = {s.name: s for s in specs}
        usable = {k: v for k, v in self.fallback.items() if k in by_name and not by_name[k].shadow and v >= 0}
        restored = [s.model_copy(update={"weight": usable.get(s.name, s.weight)}) for s in specs]
        if sum(s.weight for s in restored if not s.shadow) <= 0:
            log.error("fallback weights %s would leave no traffic; starting with the saved weights", self.fallback)
            return specs
        self.fallback_applied_at = self.started_at
        log.warning(
            "restarted with fallback weights %s (saved weights were %s)",
            usable,
            {s.name: s.weight for s in specs if s.name in usable},
        )
        return restored

    async def start(self) -> None:
        self.cache = ModelCache(self.config.model_cache)
        data = self._read_state()
        specs = self._restore(data, self._initial_specs(data))
        for spec in specs:
            variant = self._register(spec)
            task = asyncio.get_running_loop().create_task(self._load_into(variant))
            self._loads.add(task)
            task.add_done_callback(self._loads.discard)
            self._initial.append(task)
        self.save_state()

    async def wait_loaded(self, timeout: float) -> bool:
        """Wait until the variants present at start have loaded or failed; False after ``timeout`` seconds."""
        if not self._initial:
            return True
        _, pending = await asyncio.wait(self._initial, timeout=timeout)
        return not pending

    async def close(self) -> None:
        for task in list(self._loads):
            task.cancel()
        for variant in list(self.variants.values()):
            await self._shutdown(variant)
        if self.cache is not None:
            self.cache.close([v.download for v in self.variants.values()])

    def _release(self, variant: Variant) -> None:
        """Delete the variant's downloaded copy unless another variant loads from the same entry."""
        if self.cache is not None and variant.download is not None:
            in_use = [v.download for v in self.variants.values() if v is not variant]
            self.cache.release(variant.download, in_use)

    def _register(self, spec: VariantSpec) -> Variant:
        variant = Variant(spec)
        if self.redacts_output(spec):
            counter = self.telemetry.output_pii_redactions

            def count(counts: Mapping[str, int], name: str = spec.name) -> None:
                for kind, n in counts.items():
                    counter.labels(name, kind).inc(n)

            variant.redact_output = count
        self.variants[spec.name] = variant
        self.telemetry.ready.labels(spec.name).set(0)
        self._publish_weights()
        return variant

    async def _load_into(self, variant: Variant) -> None:
        try:
            cache = self.cache.root if self.cache is not None else self.config.model_cache
            folder: ModelFolder = await asyncio.to_thread(resolve_source, variant.spec.source, cache=cache)
            variant.download = folder.download
            if self.variants.get(variant.name) is not variant:  # removed while it downloaded
                self._release(variant)
                return
            model = await asyncio.to_thread(load_model, folder)
        except ModelLoadError as err:
            variant.status, variant.error = "failed", err.message
            log.error("variant %s failed to load: %s", variant.name, err.message)
            return
        except Exception as err:  # a loader bug must show up as a failed variant, not kill the server
            variant.status, variant.error = "failed", f"{type(err).__name__}: {err}"
            log.exception("variant %s failed to load", variant.name)
            return
        if self.variants.get(variant.name) is not variant:  # removed while it loaded
            return
        variant.model = model
        if "classify" in model.tasks:
            spec = variant.spec
            batcher: Batcher[list[str], list[Classification]] = Batcher(
                variant.name,
                functools.partial(_classify_batch, model),
                variant.executor,
                max_size=spec.max_batch_size or self.config.max_batch_size,
                max_delay_s=(
                    spec.max_batch_delay_ms if spec.max_batch_delay_ms is not None else self.config.max_batch_delay_ms
                )
                / 1000.0,
                size_of=len,
                on_batch=self.telemetry.batch_size.labels(variant.name).observe,
            )
            batcher.start()
            variant.classifier = batcher
        configure = getattr(model, "configure_batching", None)
        if callable(configure):  # a causal LM's decode loop
            configure(
                max_batch_size=variant.spec.max_batch_size or self.config.max_decode_batch_size,
                observer=self.telemetry.generation(variant.name),
                name=f"variant {variant.name!r}",
            )
        variant.status, variant.loaded_at = "ready", time.time()
        self.telemetry.ready.labels(variant.name).set(1)
        log.info("variant %s ready (%s from %s)", variant.name, model.kind, variant.spec.source)

    async def _shutdown(self, variant: Variant) -> None:
        if variant.classifier is not None:
            await variant.classifier.stop()
        close = getattr(variant.model, "close", None)
        if callable(close):  # a decode loop: answers what it holds (for up to 30 s), then stops
            await asyncio.to_thread(close, 30.0)
        variant.executor.shutdown(wait=False, cancel_futures=True)

    # ---- admin -----------------------------------------------------------------------------------------------
    def get(self, name: str) -> Variant:
        variant = self.variants.get(name)
        if variant is None:
            raise NotFound(f"unknown variant {name!r}; this server has {sorted(self.variants)}")
        return variant

    def _check_fault(self, fault: object) -> None:
        if fault is not None and not self.config.enable_fault_injection:
            raise FaultInjectionDisabled()

    async def add(self, spec: VariantSpec, *, wait: bool) -> Variant:
        self._check_fault(spec.fault)
        if spec.name in self.variants:
            raise Conflict(f"variant {spec.name!r} exists; remove it first or add the new model under another name")
        variant = self._register(spec)
        if not wait:
            task = asyncio.get_running_loop().create_task(self._load_into(variant))
            self._loads.add(task)
            task.add_done_callback(self._loads.discard)
            self.save_state()
            return variant
        await self._load_into(variant)
        if variant.status == "failed":
            self.variants.pop(spec.name, None)
            self.telemetry.forget(spec.name)
            await self._shutdown(variant)
            self._release(variant)
            self._publish_weights()
            raise ModelLoadError(f"variant {spec.name!r} not added: {variant.error}")
        self.save_state()
        return variant

    async def remove(self, name: str, *, force: bool = False) -> None:
        variant = self.get(name)
        if not force:
            rest = [v.spec for k, v in self.variants.items() if k != name]
            if not variant.spec.shadow and variant.spec.weight > 0:
                self._check_traffic(rest, f"removing {name!r} (add ?force=true to remove it anyway)")
        del self.variants[name]
        await self._shutdown(variant)
        self._release(variant)
        self.telemetry.forget(name)
        if self.fallback is not None and name in self.fallback:
            self.fallback = {k: v for k, v in self.fallback.items() if k != name} or None
        self._publish_weights()
        self.save_state()

    def _weighted(self, weights: Mapping[str, float], what: str) -> dict[str, VariantSpec]:
        """Every variant's spec with ``weights`` applied (the others keep theirs), checked; changes nothing."""
        unknown = sorted(set(weights) - set(self.variants))
        if unknown:
            raise NotFound(f"unknown variant(s) {unknown} in {what}; this server has {sorted(self.variants)}")
        shadows = sorted(k for k in weights if self.variants[k].spec.shadow)
        if shadows:
            raise BadRequest(
                f"variant(s) {shadows} are shadows and take no traffic weight; set mirror_percent with "
                'PATCH /admin/variants/NAME, or {"shadow": false} to make one a primary'
            )
        new = {
            k: v.spec.model_copy(update={"weight": float(weights.get(k, v.spec.weight))})
            for k, v in self.variants.items()
        }
        self._check_traffic(new.values(), f"{what} {dict(weights)}")
        return new

    def set_weights(self, weights: Mapping[str, float], fallback: Mapping[str, float] | None = None) -> None:
        """Set the weights of the named variants (the others keep theirs); all or nothing. ``fallback`` also
        records the weights to restore if the server restarts before the next change (see :meth:`set_fallback`)."""
        new = self._weighted(weights, "weights")
        checked = self._checked_fallback(fallback, new) if fallback is not None else None
        for name, spec in new.items():
            self.variants[name].spec = spec
        if checked is not None:
            self.fallback, self.fallback_set_at = checked, time.time()
        self._publish_weights()
        self.save_state()

    def set_fallback(self, weights: Mapping[str, float]) -> None:
        """Record the weights a restarted server starts with (a rollout's last safe step), until cleared."""
        checked = self._checked_fallback(weights, {k: v.spec for k, v in self.variants.items()})
        self.fallback, self.fallback_set_at = checked, time.time()
        self.save_state()

    def _checked_fallback(self, fallback: Mapping[str, float], specs: Mapping[str, VariantSpec]) -> dict[str, float]:
        """The fallback, once it names only variants of this server and leaves traffic when applied to ``specs``.

        A shadow may be named with weight 0 (a controller may list every variant of a rollout): it is left as is.
        """
        unknown = sorted(set(fallback) - set(specs))
        if unknown:
            raise NotFound(f"unknown variant(s) {unknown} in fallback weights; this server has {sorted(specs)}")
        shadows = sorted(k for k, w in fallback.items() if specs[k].shadow and w > 0)
        if shadows:
            raise BadRequest(f"variant(s) {shadows} are shadows: a fallback can only give them weight 0")
        restored = [s.model_copy(update={"weight": float(fallback.get(k, s.weight))}) for k, s in specs.items()]
        self._check_traffic([s for s in restored if not s.shadow], f"fallback weights {dict(fallback)}")
        return {k: float(v) for k, v in fallback.items()}

    def clear_fallback(self) -> None:
        """Forget the fallback (the rollout finished or was abandoned); ``fallback_applied_at`` stays, as a fact
        about this boot."""
        self.fallback = self.fallback_set_at = None
        self.save_state()

    def server_info(self) -> dict[str, object]:
        """What a rollout controller checks: did the server restart, and with which weights did it come back."""
        fallback = None
        if self.fallback is not None:
            fallback = {"weights": dict(self.fallback), "set_at": self.fallback_set_at}
        return {
            "boot_count": self.boot_count,
            "started_at": self.started_at,
            "pid": os.getpid(),
            "supervisor_restarts": self.config.supervisor_restarts,
            "fallback": fallback,
            "fallback_applied_at": self.fallback_applied_at,
            "weights": {v.name: v.spec.weight for v in self.variants.values() if not v.spec.shadow},
        }

    def update(self, name: str, change: UpdateVariantRequest) -> Variant:
        self._check_fault(change.fault)
        variant = self.get(name)
        update: dict[str, object] = {
            k: v for k, v in change.model_dump(exclude_unset=True, exclude={"clear_fault"}).items() if v is not None
        }
        if change.fault is not None:
            update["fault"] = change.fault
        if change.clear_fault:
            update["fault"] = None
        spec = variant.spec.model_copy(update=update)
        if "weight" in update or "shadow" in update:
            others = [v.spec for k, v in self.variants.items() if k != name]
            self._check_traffic([*others, spec], f"this change to {name!r}")
        variant.spec = spec
        self._publish_weights()
        self.save_state()
        return variant

    @staticmethod
    def _check_traffic(specs: Iterable[VariantSpec], what: str) -> None:
        total = sum(s.weight for s in specs if not s.shadow)
        if total <= 0:
            raise BadRequest(
                f"{what} would leave no traffic: the weights of the non-shadow variants must sum to more than 0"
            )

    def traffic_percent(self, spec: VariantSpec) -> float:
        if spec.shadow:
            return 0.0
        total = sum(v.spec.weight for v in self.variants.values() if not v.spec.shadow)
        return 100.0 * spec.weight / total if total > 0 else 0.0

    def _publish_weights(self) -> None:
        for variant in self.variants.values():
            self.telemetry.weight.labels(variant.name).set(self.traffic_percent(variant.spec))

    def redacts_output(self, spec: VariantSpec) -> bool:
        """The variant's own ``redact_output_pii``, else the server's."""
        return spec.redact_output_pii if spec.redact_output_pii is not None else self.config.redact_output_pii

    def info(self, variant: Variant) -> VariantInfo:
        spec = variant.spec
        return VariantInfo(
            name=spec.name,
            source=spec.source,
            weight=spec.weight,
            traffic_percent=round(self.traffic_percent(spec), 6),
            shadow=spec.shadow,
            mirror_percent=spec.mirror_percent,
            status=variant.status,  # type: ignore[arg-type]
            kind=variant.model.kind if variant.model is not None else None,
            error=variant.error,
            fault=spec.fault,
            loaded_at=variant.loaded_at,
            redact_output_pii=variant.redact_output is not None,
        )

    def save_state(self) -> None:
        path = self.config.state_file
        if path is None:
            return
        data: dict[str, object] = {
            "version": STATE_VERSION,
            "variants": [v.spec.model_dump(mode="json", exclude_none=True) for v in self.variants.values()],
            "boot": {
                "count": self.boot_count,
                "started_at": self.started_at,
                "fallback_applied_at": self.fallback_applied_at,
            },
        }
        if self.fallback is not None:
            data["fallback"] = {"weights": self.fallback, "set_at": self.fallback_set_at}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    # ---- routing ---------------------------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict[str, str]]:
        """Ready when every non-shadow variant with traffic is loaded (and there is at least one)."""
        serving = {v.name: v.status for v in self.variants.values() if not v.spec.shadow and v.spec.weight > 0}
        return bool(serving) and all(s == "ready" for s in serving.values()), serving

    def pick(self, task: Task, pinned: str | None) -> Variant:
        if pinned is not None:
            variant = self.get(pinned)
            if variant.status != "ready":
                raise Unavailable(
                    f"variant {pinned!r} is {variant.status}" + (f": {variant.error}" if variant.error else "")
                )
            if not variant.serves(task):
                raise BadRequest(
                    f"variant {pinned!r} is a {variant.model.kind if variant.model else '?'}; it cannot {task}"
                )
            return variant
        candidates = [v for v in self.variants.values() if not v.spec.shadow and v.spec.weight > 0 and v.serves(task)]
        if candidates:
            return random.choices(candidates, weights=[v.spec.weight for v in candidates])[0]
        if any(v.status == "loading" for v in self.variants.values()):
            raise Unavailable("no variant can take this request yet: models are still loading; retry shortly")
        kinds = {v.name: (v.model.kind if v.model else v.status) for v in self.variants.values()}
        raise BadRequest(f"no variant with traffic can {task}; variants: {kinds}")

    def shadows_for(self, task: Task) -> list[Variant]:
        return [
            v
            for v in self.variants.values()
            if v.spec.shadow and v.serves(task) and random.random() * 100.0 < v.spec.mirror_percent
        ]


def _classify_batch(model: ServedModel, batch: Sequence[list[str]]) -> list[list[Classification] | BaseException]:
    """One forward pass for every text of every request in the batch, split back per request."""
    flat = [text for texts in batch for text in texts]
    results = model.classify(flat)
    out: list[list[Classification] | BaseException] = []
    start = 0
    for texts in batch:
        out.append(results[start : start + len(texts)])
        start += len(texts)
    return out
