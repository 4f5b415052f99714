"""All the HTTP routes, assembled from one module per endpoint."""

from fastapi import APIRouter

from . import embeddings, health, models, playground, rerank

router = APIRouter()
for _module in (embeddings, rerank, models, health, playground):
    router.include_router(_module.router)
