"""Admin routes under ``/admin`` (bearer token): variants, weights and fallback weights, boot info, failure
injection (test servers only) and a JSON metrics snapshot."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials

from airflow_llmops.serving.config import VariantSpec
from airflow_llmops.serving.deps import ServerState, bearer, check_admin, server_state
from airflow_llmops.serving.schemas import (
    AddVariantRequest,
    FallbackRequest,
    ServerInfo,
    UpdateVariantRequest,
    VariantInfo,
    VariantsResponse,
    WeightsRequest,
)

DEFAULT_WINDOW_S = 300.0


def _admin(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    check_admin(request, credentials)


router = APIRouter(prefix="/admin", dependencies=[Depends(_admin)], tags=["admin"])
State = Annotated[ServerState, Depends(server_state)]


def _list(state: ServerState) -> VariantsResponse:
    registry = state.registry
    return VariantsResponse(variants=[registry.info(v) for v in registry.variants.values()], fallback=registry.fallback)


@router.get("/variants", response_model=VariantsResponse)
async def list_variants(state: State) -> Any:
    """Every variant with its weight, traffic share, status (loading/ready/failed) and fault settings."""
    return _list(state)


@router.post("/variants", response_model=VariantInfo, status_code=201)
async def add_variant(body: AddVariantRequest, state: State, response: Response) -> Any:
    """Add a variant (default weight 0). ``wait`` (default) answers 201 once loaded, or 422 with the load error;
    ``wait=false`` answers 202 at once and the model loads in the background (watch ``GET /admin/variants``)."""
    spec = VariantSpec.model_validate(body.model_dump(exclude={"wait"}))
    variant = await state.registry.add(spec, wait=body.wait)
    if not body.wait:
        response.status_code = 202
    return state.registry.info(variant)


@router.get("/variants/{name}", response_model=VariantInfo)
async def get_variant(name: str, state: State) -> Any:
    return state.registry.info(state.registry.get(name))


@router.patch("/variants/{name}", response_model=VariantInfo)
async def update_variant(name: str, body: UpdateVariantRequest, state: State) -> Any:
    """Change ``weight``, ``shadow``, ``mirror_percent`` or ``fault`` (``clear_fault: true`` removes it)."""
    return state.registry.info(state.registry.update(name, body))


@router.delete("/variants/{name}")
async def remove_variant(name: str, state: State, force: bool = False) -> Any:
    """Remove a variant; refused (400) when it would leave no traffic, unless ``force=true``."""
    await state.registry.remove(name, force=force)
    return {"removed": name}


@router.put("/weights", response_model=VariantsResponse)
async def set_weights(body: WeightsRequest, state: State) -> Any:
    """Set relative weights of the named variants (others keep theirs): ``{"weights": {"blue": 90, "green": 10}}``.

    Weights are non-negative and must sum to more than 0 over the non-shadow variants; unknown names → 404.
    ``"fallback": {"blue": 100, "green": 0}`` also records the weights a restarted server starts with (a rollout
    step sets the next weights and its last safe ones in one call); without it the fallback is unchanged.
    """
    state.registry.set_weights(body.weights, body.fallback)
    return _list(state)


@router.put("/fallback", response_model=ServerInfo)
async def set_fallback(body: FallbackRequest, state: State) -> Any:
    """Record the weights a restarted server starts with, kept in the state file until ``DELETE /admin/fallback``:
    if the server dies mid-rollout it comes back on them ("old weights first"), not on the canary step."""
    state.registry.set_fallback(body.weights)
    return state.registry.server_info()


@router.delete("/fallback", response_model=ServerInfo)
async def clear_fallback(state: State) -> Any:
    """Forget the fallback weights (the rollout ended)."""
    state.registry.clear_fallback()
    return state.registry.server_info()


@router.get("/state", response_model=ServerInfo)
async def server_state_info(state: State) -> Any:
    """``boot_count`` (starts with this state file), ``started_at``, ``pid``, ``supervisor_restarts``, the
    ``fallback`` weights and ``fallback_applied_at`` (when this boot started on them), and the current weights."""
    return state.registry.server_info()


@router.get("/metrics")
async def metrics_snapshot(
    state: State,
    since: Annotated[float | None, Query(description="unix seconds; default: now - window_s", ge=0)] = None,
    window_s: Annotated[float, Query(gt=0, le=86_400 * 7)] = DEFAULT_WINDOW_S,
) -> Any:
    """Per variant: requests, errors, error_rate, p50/p95 latency (ms) and tokens since ``since``; for the
    whole server process: the CPU seconds it used since then (``process``, for energy estimates).

    Numbers cover requests that finished at or after ``since`` (within the server's metrics retention).
    """
    now = time.time()
    start = since if since is not None else now - window_s
    variants = {}
    for name, variant in state.registry.variants.items():
        snap = state.telemetry.snapshot(name, since=start)
        snap.update(shadow=variant.spec.shadow, traffic_percent=round(state.registry.traffic_percent(variant.spec), 6))
        variants[name] = snap
    return {"now": now, "since": start, "variants": variants, "process": state.telemetry.cpu_seconds(since=start)}
