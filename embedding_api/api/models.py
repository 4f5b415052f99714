"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from .auth import check_api_key
from .common import json_response
from .errors import APIError
from .schemas import ErrorResponse

router = APIRouter()


def _model_card(request: Request, model_id: str) -> dict:
    card = {"id": model_id, "object": "model", "created": request.app.state.created, "owned_by": "embedding_api"}
    service = request.app.state.service
    if service is not None:
        card.update(
            family=service.info.family,
            embedding_dimension=service.info.dimension,
            modalities=service.modalities,
        )
    return card


@router.get("/v1/models", dependencies=[Depends(check_api_key)], responses={401: {"model": ErrorResponse}})
async def list_models(request: Request) -> Response:
    settings = request.app.state.settings
    return json_response({"object": "list", "data": [_model_card(request, settings.model_name)]})


@router.get(
    "/v1/models/{model_id:path}",
    dependencies=[Depends(check_api_key)],
    responses={status: {"model": ErrorResponse} for status in (401, 404)},
)
async def get_model(request: Request, model_id: str) -> Response:
    settings = request.app.state.settings
    if model_id not in settings.model_ids:
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    return json_response(_model_card(request, model_id))

