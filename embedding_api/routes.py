"""HTTP routes: /v1/embeddings, /v1/models, /health."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Awaitable

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from .auth import check_api_key
from .errors import APIError, error_response, invalid
from .inputs import parse_request
from .schemas import EmbeddingResponse, ErrorResponse, embedding_response, request_body_openapi
from .service import Service

log = logging.getLogger("embedding_api")
router = APIRouter()
CLIENT_CLOSED = 499  # nginx's "client closed request": logged, never seen by the client
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}


def _json(body: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _service(request: Request) -> Service:
    service = request.app.state.service
    status = request.app.state.status
    if service is None or status != "ok":
        if status == "loading":
            raise APIError(503, "The model is loading; retry shortly.", code="model_not_ready",
                           headers={"Retry-After": "2"})
        raise APIError(503, "The server is shutting down; retry on another instance.", code="shutting_down",
                       headers={"Retry-After": "2"})
    return service


async def _read_json(request: Request, limit: int):
    too_large = APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(CLIENT_CLOSED, "The client closed the connection while sending the body.",
                       code="client_closed_request") from None
    raw = b"".join(chunks)
    if not raw:
        raise invalid("The request body is empty; send a JSON object with 'input'.", None, "invalid_json")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    # orjson refuses integers beyond 64 bits; the standard parser reads them, so that a huge token id
    # is refused by the input rules with the field named, like any other out-of-range id.
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise invalid("The request body is not valid JSON.", None, "invalid_json") from None


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingResponse,
    responses=_ERRORS,
    openapi_extra=request_body_openapi(),
)
async def create_embeddings(request: Request) -> Response:
    # Checked inline rather than as a dependency: FastAPI runs a sync dependency in a thread pool,
    # a hop that cost ~30% of throughput on the hot path.
    check_api_key(request)
    service = _service(request)
    settings = service.settings
    body = await _read_json(request, settings.max_request_bytes)
    parsed = parse_request(body, service.rules, settings.model_ids)
    vectors, tokens = await _run_watched(request, service.embed(parsed), settings.request_timeout)
    return embedding_response(vectors, parsed.encoding_format, settings.model_name, tokens)


async def _until_disconnected(request: Request) -> None:
    """Returns when the client has gone. The body has been read, so the next ASGI message is
    `http.disconnect`, sent when the connection drops (or once the response is complete)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # a stray body message: never spin


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # mark it retrieved: an abandoned task must not log "never retrieved"


async def _run_watched(request: Request, work: Awaitable, timeout: float):
    """Run the embed path as a task that ends as soon as it cannot be useful any more.

    uvicorn does not cancel a handler when its client goes away, so the task is cancelled here
    when the client disconnects (its queued inputs then never reach the model), when
    REQUEST_TIMEOUT has passed since the body was read (images, preparation, queue and forward
    passes included), and by the shutdown grace (`app.state.inflight`).
    """
    task = asyncio.ensure_future(work)
    task.add_done_callback(_retrieve)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    inflight: set = request.app.state.inflight
    inflight.add(task)
    try:
        await asyncio.wait((task, watcher), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        inflight.discard(task)
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    if task.done():  # cancelled by the shutdown grace
        raise APIError(
            503,
            "The server is shutting down and the request did not finish within the grace period.",
            code="shutting_down",
            headers={"Retry-After": "1"},
        )
    if watcher.done() and not watcher.cancelled():
        log.info("client disconnected; its request was cancelled")
        raise APIError(CLIENT_CLOSED, "The client closed the connection.", code="client_closed_request")
    raise APIError(
        503,
        f"The request did not finish within {timeout:g} s.",
        code="timeout",
        headers={"Retry-After": "1"},
    )


def _model_card(request: Request, model_id: str) -> dict:
    card = {"id": model_id, "object": "model", "created": request.app.state.created, "owned_by": "embedding_api"}
    service = request.app.state.service
    if service is not None:
        card.update(
            family=service.info.family,
            embedding_dimension=service.info.dimension,
            modalities=["text", "image"] if service.info.takes_images else ["text"],
        )
    return card


@router.get("/v1/models", dependencies=[Depends(check_api_key)], responses={401: {"model": ErrorResponse}})
async def list_models(request: Request) -> Response:
    settings = request.app.state.settings
    return _json({"object": "list", "data": [_model_card(request, settings.model_name)]})


@router.get(
    "/v1/models/{model_id:path}",
    dependencies=[Depends(check_api_key)],
    responses={status: {"model": ErrorResponse} for status in (401, 404)},
)
async def get_model(request: Request, model_id: str) -> Response:
    settings = request.app.state.settings
    if model_id not in settings.model_ids:
        return error_response(
            404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found"
        )
    return _json(_model_card(request, model_id))


@router.get(
    "/health",
    responses={503: {"description": "The model is loading, or the server is shutting down ('status' says which)"}},
)
async def health(request: Request) -> Response:
    state = request.app.state
    settings = state.settings
    body = {"status": state.status, "model": settings.model_name, "model_path": settings.model_path}
    if state.service is None or state.status != "ok":
        return _json(body, 503)
    info = state.service.info
    body.update(
        device=info.device.split(":")[0],
        device_name=info.device,
        cuda_available=_cuda_available(),
        dtype=info.dtype,
        family=info.family,
        takes_images=info.takes_images,
        embedding_dimension=state.service.rules.default_dimension,
        native_dimension=info.dimension,
        max_image_width=settings.max_image_width,
        max_image_height=settings.max_image_height,
        queued_inputs=state.service.batcher.queued,
        inputs_embedded=state.service.batcher.inputs_run,
        batches_run=state.service.batcher.batches_run,
        requests_in_flight=len(state.inflight),
        uptime_s=round(time.time() - state.created, 1),
    )
    return _json(body)


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())
