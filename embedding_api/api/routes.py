"""All the HTTP routes, assembled from one module per endpoint."""

from fastapi import APIRouter

from . import cohere, embeddings, health, models, playground, rerank, voyage

router = APIRouter()
for _module in (embeddings, rerank, cohere, voyage, models, health, playground):
    router.include_router(_module.router)
