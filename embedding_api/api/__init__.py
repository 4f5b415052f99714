"""The HTTP API: one module per endpoint, plus errors, auth, schemas and what routes share."""

from fastapi import APIRouter

from . import embeddings, health, models, rerank

router = APIRouter()
for _module in (embeddings, rerank, models, health):
    router.include_router(_module.router)
