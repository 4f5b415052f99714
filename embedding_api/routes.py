"""HTTP routes: /v1/embeddings, /v1/models, /health."""

from __future__ import annotations

import time

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from .auth import check_api_key
from .errors import APIError, error_response, invalid
from .inputs import parse_request
from .schemas import EmbeddingResponse, ErrorResponse, embedding_response, request_body_openapi
from .service import Service

router = APIRouter()
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}


def _json(body: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _service(request: Request) -> Service:
    service = request.app.state.service
    if service is None or request.app.state.status != "ok":
        raise APIError(
            503,
            f"The model is {request.app.state.status}; retry shortly.",
            code="model_not_ready",
            headers={"Retry-After": "2"},
        )
    return service


async def _read_json(request: Request, limit: int):
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        raise invalid("The request body is empty; send a JSON object with 'input'.", None, "invalid_json")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid("The request body is not valid JSON.", None, "invalid_json") from None


@router.post(
    "/v1/embeddings",
    dependencies=[Depends(check_api_key)],
    response_model=EmbeddingResponse,
    responses=_ERRORS,
    openapi_extra=request_body_openapi(),
)
async def create_embeddings(request: Request) -> Response:
    service = _service(request)
    settings = service.settings
    body = await _read_json(request, settings.max_request_bytes)
    parsed = parse_request(body, service.rules, settings.model_ids)
    vectors, tokens = await service.embed(parsed)
    return embedding_response(vectors, parsed.encoding_format, settings.model_name, tokens)


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


@router.get("/v1/models", dependencies=[Depends(check_api_key)])
async def list_models(request: Request) -> Response:
    settings = request.app.state.settings
    return _json({"object": "list", "data": [_model_card(request, settings.model_name)]})


@router.get("/v1/models/{model_id:path}", dependencies=[Depends(check_api_key)], responses=_ERRORS)
async def get_model(request: Request, model_id: str) -> Response:
    settings = request.app.state.settings
    if model_id not in settings.model_ids:
        return error_response(
            404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found"
        )
    return _json(_model_card(request, model_id))


@router.get("/health")
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
        uptime_s=round(time.time() - state.created, 1),
    )
    return _json(body)


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())
