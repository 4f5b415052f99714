"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from .auth import check_api_key
from ..engine.calibration import Calibration
from ..formats import EMBED_DTYPES, OUTPUT_DTYPES
from ..inputs import parse_dimensions
from .common import json_response, ready_model, run_watched
from .errors import APIError
from .schemas import ErrorResponse

router = APIRouter()


def _model_card(request: Request, model_id: str, entry=None) -> dict:
    card = {"id": model_id, "object": "model", "created": request.app.state.created, "owned_by": "embedding_api"}
    entry = entry or request.app.state.models.find(model_id)
    card["kind"] = entry.kind
    service = entry.service
    if service is not None:
        card.update(family=service.info.family, modalities=service.modalities, dtype=service.info.dtype,
                    dtype_reason=service.info.dtype_reason, prepacked=service.info.prepacked,
                    compiled=service.info.compiled)
        if entry.kind == "embedding":
            card["embedding_dimension"] = service.info.dimension
            card.update(output_dtypes=list(OUTPUT_DTYPES), embed_dtypes=list(EMBED_DTYPES))
        if service.info.takes_images:
            card["image_preprocessing"] = entry.settings.image_preprocessing()
    return card


@router.get("/v1/models", dependencies=[Depends(check_api_key)], responses={401: {"model": ErrorResponse}})
async def list_models(request: Request) -> Response:
    entries = request.app.state.models.entries
    return json_response({"object": "list", "data": [_model_card(request, e.name, e) for e in entries]})


@router.get(
    "/v1/models/{model_id:path}/quantization",
    dependencies=[Depends(check_api_key)],
    responses={status: {"model": ErrorResponse} for status in (400, 401, 404, 503)},
)
async def get_quantization(request: Request, model_id: str) -> Response:
    """The int8/uint8 ranges of an embedding model at `dimensions` (default: its default size):
    `ranges` is [minimums, maximums], one value per component, as sentence-transformers'
    `quantize_embeddings(..., ranges=...)` takes them."""
    entry = ready_model(request, {"model": model_id}, "embedding")
    service = entry.service
    given = parse_dimensions(dict(request.query_params), service.rules)
    dimensions = given if given is not None else service.rules.default_dimension
    ranges = await run_watched(request, service.calibration.ranges(dimensions), service.settings.request_timeout)
    return json_response({
        "object": "quantization",
        "model": entry.name,
        "dimensions": dimensions,
        "ranges": ranges.tolist(),
        "digest": Calibration.digest(ranges),
        "calibration": service.calibration.size,
        "uint8": "clip(trunc((v - min) / step), 0, 255), step = (max - min) / 255, in float32",
        "int8": "clip(trunc((v - min) / step - 128), -128, 127)",
    })


@router.get(
    "/v1/models/{model_id:path}",
    dependencies=[Depends(check_api_key)],
    responses={status: {"model": ErrorResponse} for status in (401, 404)},
)
async def get_model(request: Request, model_id: str) -> Response:
    if request.app.state.models.find(model_id) is None:
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    return json_response(_model_card(request, model_id))

