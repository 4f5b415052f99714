"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from .auth import check_api_key
from .common import json_response
from .errors import APIError
from .schemas import ErrorResponse

router = APIRouter()


def _model_card(request: Request, model_id: str, entry=None) -> dict:
    card = {"id": model_id, "object": "model", "created": request.app.state.created, "owned_by": "embedding_api"}
    entry = entry or request.app.state.models.find(model_id)
    card["kind"] = entry.kind
    service = entry.service
    if service is not None:
        card.update(family=service.info.family, modalities=service.modalities)
        if entry.kind == "embedding":
            card["embedding_dimension"] = service.info.dimension
        if service.info.takes_images:
            card["image_preprocessing"] = entry.settings.image_preprocessing()
    return card


@router.get("/v1/models", dependencies=[Depends(check_api_key)], responses={401: {"model": ErrorResponse}})
async def list_models(request: Request) -> Response:
    entries = request.app.state.models.entries
    return json_response({"object": "list", "data": [_model_card(request, e.name, e) for e in entries]})


@router.get(
    "/v1/models/{model_id:path}",
    dependencies=[Depends(check_api_key)],
    responses={status: {"model": ErrorResponse} for status in (401, 404)},
)
async def get_model(request: Request, model_id: str) -> Response:
    if request.app.state.models.find(model_id) is None:
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    return json_response(_model_card(request, model_id))

