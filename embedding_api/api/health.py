"""GET /health: never behind auth; 200 when the model serves, 503 while loading or draining.

The Kubernetes probes: /health/live answers 200 as long as the process serves HTTP (also while the
model loads and while draining: restarting would not help) and its models can run (a model process
or model worker that has ended answers 503 "failed": only a restart helps); /health/ready answers
200 only when the model is loaded, runs, and the server is not draining (take this pod out of the
Service otherwise).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from .common import json_response

router = APIRouter()


@router.get(
    "/health",
    responses={503: {"description": "The model is loading, or the server is shutting down ('status' says which)"}},
)
async def health(request: Request) -> Response:
    state = request.app.state
    settings = state.models.default.settings
    body = {"status": state.status, "model": settings.model_name, "model_path": settings.model_path}
    entries = state.models.entries
    if len(entries) > 1 or entries[0].kind != "embedding":
        body["models"] = [_model_status(e) for e in entries]
    if state.service is None or state.status != "ok":
        return json_response(body, 503)
    failed = _failed(state)
    if failed:
        body.update(status="failed", failed_models=failed)
        return json_response(body, 503)
    info = state.service.info
    body.update(
        device=info.device.split(",")[0].split(":")[0],
        device_name=info.device,
        cuda_available=_cuda_available(),
        dtype=info.dtype,
        family=info.family,
        takes_images=info.takes_images,
        modalities=state.service.modalities,
        embedding_dimension=state.service.rules.default_dimension,
        native_dimension=info.dimension,
        max_image_width=settings.max_image_width,
        max_image_height=settings.max_image_height,
        image_preprocessing=settings.image_preprocessing() if info.takes_images else None,
        queued_inputs=state.service.batcher.queued,
        inputs_embedded=state.service.batcher.inputs_run,
        batches_run=state.service.batcher.batches_run,
        workers=[
            {"worker": w.index, "device": w.device, "batches": w.batches, "inputs": w.inputs, "busy": w.busy}
            for w in state.service.batcher.workers
        ],
        requests_in_flight=len(state.inflight),
        uptime_s=round(time.time() - state.created, 1),
    )
    replica = getattr(state, "replica", None)  # set when served as a Ray Serve replica
    if replica:
        body["replica"] = replica
    return json_response(body)


@router.get("/health/live", responses={200: {"description": "The process serves HTTP"}})
async def live(request: Request) -> Response:
    if _failed(request.app.state):
        return json_response({"status": "failed"}, 503)
    return json_response({"status": "alive"})


@router.get(
    "/health/ready",
    responses={503: {"description": "The model is loading, or the server is draining ('status' says which)"}},
)
async def ready(request: Request) -> Response:
    state = request.app.state
    ok = state.service is not None and state.status == "ok"
    if ok and _failed(state):
        return json_response({"status": "failed"}, 503)
    return json_response({"status": "ready" if ok else state.status}, 200 if ok else 503)


def _failed(state) -> list[str]:
    """The models whose model process or model worker has ended."""
    return [e.name for e in state.models.entries if e.service is not None and not e.service.alive()]


def _model_status(entry) -> dict:
    status = {"name": entry.name, "kind": entry.kind, "path": entry.settings.model_path,
              "status": "ok" if entry.service is not None else "loading"}
    service = entry.service
    if service is not None:
        status.update(family=service.info.family, takes_images=service.info.takes_images,
                      queued=service.batcher.queued, batches_run=service.batcher.batches_run)
    return status


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())
