"""GET /health: never behind auth; 200 when a model serves, 503 while loading or draining.

Each model is "ok" (every model worker serves), "degraded" (some do: a model process is being
restarted, or a forward pass is stuck), "unavailable" (none does now) or "failed" (every worker gave
up restarting its model process: only a restart of the server helps).

The Kubernetes probes: /health/live answers 200 as long as the process serves HTTP (also while the
model loads and while draining: restarting would not help) and some model is not "failed" (503
"failed" once every model has failed); /health/ready answers 200 when the models are loaded, the
server is not draining and at least one model is "ok" or "degraded" (one model's trouble does not
take the others out of rotation; its requests answer 503 `model_unavailable`); `?model=NAME` asks
about that model alone.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from .common import json_response
from .errors import error_response

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
    overall = _overall([e.service.state() for e in entries])
    if overall != "ok":
        body.update(status=overall, models=[_model_status(e) for e in entries])
        if overall not in _SERVING:
            return json_response(body, 503)
    info = state.service.info
    body.update(
        device=info.device.split(",")[0].split(":")[0],
        device_name=info.device,
        cuda_available=_cuda_available(),
        dtype=info.dtype,
        dtype_reason=info.dtype_reason,
        dtype_probe_ms=info.dtype_probe_ms,
        prepacked=info.prepacked,
        prepack_reason=info.prepack_reason,
        compiled=info.compiled,
        compile_reason=info.compile_reason,
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
            _worker(w) for w in state.service.batcher.workers
        ],
        requests_in_flight=len(state.inflight),
        uptime_s=round(time.time() - state.created, 1),
    )
    replica = getattr(state, "replica", None)  # set when served as a Ray Serve replica
    if replica:
        body["replica"] = replica
    return json_response(body)


_SERVING = ("ok", "degraded")


def _overall(states: list[str]) -> str:
    """ok when every model is; degraded when some model serves; else unavailable, or failed when all are."""
    if all(s == "ok" for s in states):
        return "ok"
    if any(s in _SERVING for s in states):
        return "degraded"
    return "failed" if all(s == "failed" for s in states) else "unavailable"


def _worker(w) -> dict:
    return {"worker": w.index, "device": w.device, "state": w.state, "stuck": w.stuck, "restarts": w.restarts,
            "batches": w.batches, "inputs": w.inputs, "busy": w.busy}


@router.get("/health/live", responses={200: {"description": "The process serves HTTP"}})
async def live(request: Request) -> Response:
    state = request.app.state
    if state.service is not None and state.status == "ok":
        states = {e.name: e.service.state() for e in state.models.entries}
        if all(s == "failed" for s in states.values()):
            return json_response({"status": "failed", "failed_models": list(states)}, 503)
    return json_response({"status": "alive"})


@router.get(
    "/health/ready",
    responses={503: {"description": "The models are loading, the server is draining, or no model serves "
                                    "('status' says which; 'models' gives each model's state)"},
               404: {"description": "`model` names no served model"}},
)
async def ready(request: Request, model: str | None = None) -> Response:
    state = request.app.state
    entries = state.models.entries
    if model is not None:
        entry = state.models.find(model)
        if entry is None:
            return error_response(404, f"The model '{model}' does not exist; this server serves "
                                  f"{state.models.names()}.", param="model", code="model_not_found")
        entries = [entry]
    if state.service is None or state.status != "ok":
        return json_response({"status": state.status}, 503)
    states = {e.name: e.service.state() for e in entries}
    overall = _overall(list(states.values()))
    body = {"status": "ready" if overall in _SERVING else overall}
    if len(state.models.entries) > 1 or overall != "ok":
        body["models"] = states
    return json_response(body, 200 if overall in _SERVING else 503)


def _model_status(entry) -> dict:
    status = {"name": entry.name, "kind": entry.kind, "path": entry.settings.model_path,
              "status": "ok" if entry.service is not None else "loading"}
    service = entry.service
    if service is not None:
        status.update(status=service.state(), family=service.info.family, takes_images=service.info.takes_images,
                      queued=service.batcher.queued, batches_run=service.batcher.batches_run,
                      workers=[_worker(w) for w in service.batcher.workers])
    return status


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())
