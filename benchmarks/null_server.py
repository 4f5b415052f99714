"""The null server: what any Python server on this stack can do on this machine, with no model.

    python -m uvicorn benchmarks.null_server:app --port 8001       # FastAPI (benchmarks.realistic starts both)
    python -m uvicorn benchmarks.null_server:bare --port 8002      # bare ASGI

Two apps under the same uvicorn (httptools, uvloop) as the real server, with no tokenizer, no
batching and no model. `POST /v1/embeddings` answers one precomputed 64-dimension base64 vector per
input, with `usage`; `GET /health` answers `{"status": "ok"}` as the real server's does.

- `app`, the NULL SERVER: a FastAPI route with a pydantic request model (the OpenAI request's fields)
  returning an orjson response: what the framework the server is built on costs per request;
- `bare`: a bare ASGI callable that parses the body with orjson: the ceiling of uvicorn plus the load
  generator on this host.

Their inputs/s under the load generator are the yardsticks of the request path's own cost.
"""

from __future__ import annotations

import base64
from typing import Literal, Union

import numpy as np
import orjson
from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel

DIMENSION = 64
_VECTOR = base64.b64encode(np.full(DIMENSION, 0.125, dtype=np.float32).tobytes()).decode("ascii")
_HEALTH = orjson.dumps({"status": "ok", "requests_in_flight": 0, "queued_inputs": 0})


def _count(inputs) -> int:
    if isinstance(inputs, str):
        return 1
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], int):
        return 1  # one list of token ids
    return len(inputs) if isinstance(inputs, list) else 1


async def _body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def bare(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/health":
        await _send(send, 200, _HEALTH)
        return
    raw = await _body(receive)
    try:
        inputs = orjson.loads(raw)["input"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        await _send(send, 400, b'{"error":{"message":"bad request"}}')
        return
    n = _count(inputs)
    data = [{"object": "embedding", "index": i, "embedding": _VECTOR} for i in range(n)]
    await _send(send, 200, orjson.dumps({"object": "list", "data": data, "model": "null",
                                         "usage": {"prompt_tokens": 0, "total_tokens": 0}}))


class EmbeddingRequest(BaseModel):
    input: Union[str, list[str], list[int], list[list[int]]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


app = FastAPI()


@app.get("/health")
async def health() -> Response:
    return Response(_HEALTH, media_type="application/json")


@app.post("/v1/embeddings")
async def embeddings(request: EmbeddingRequest) -> Response:
    n = _count(request.input)
    data = [{"object": "embedding", "index": i, "embedding": _VECTOR} for i in range(n)]
    return Response(orjson.dumps({"object": "list", "data": data, "model": request.model or "null",
                                  "usage": {"prompt_tokens": 0, "total_tokens": 0}}), media_type="application/json")
