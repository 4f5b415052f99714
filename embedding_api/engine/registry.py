"""The models one process serves: MODEL_PATH (the default) and/or the MODELS list.

Each model has its own settings copy, runner, batcher and service; a request's `model` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import APIError, invalid
from ..settings import Settings, parse_models


@dataclass
class ModelEntry:
    name: str
    ids: tuple[str, ...]
    settings: Settings
    kind: str = "embedding"  # read from the checkpoint before loading, confirmed by the runner
    service: object | None = None  # Service or RerankService once loaded
    kind_reason: str = field(default="")


def model_settings(settings: Settings) -> list[Settings]:
    """One Settings per served model, the default first.

    Without MODELS: the MODEL_PATH model alone. With MODELS: its models, preceded by the MODEL_PATH
    model only when MODEL_PATH is set explicitly (then that one stays the default).
    """
    specs = parse_models(settings.models)
    out = [settings] if not specs or "model_path" in settings.model_fields_set else []
    for spec in specs:
        copy = settings.model_copy(update={
            "model_name": spec["name"],
            "model_aliases": ",".join(spec["aliases"]),
            "model_path": spec["path"],
            "model_kind": spec["kind"],
            "embedding_dimension": spec["dimension"],
            "models": "",
        })
        copy.__dict__.pop("model_ids", None)  # a cached property of the original
        out.append(copy)
    return out


class Registry:
    def __init__(self, entries: list[ModelEntry]):
        self.entries = entries
        self._by_id: dict[str, ModelEntry] = {}
        self.duplicates = []  # ids claimed by two models (MODEL_NAME/MODEL_ALIASES against MODELS)
        for entry in entries:
            for model_id in entry.ids:
                if model_id in self._by_id:
                    self.duplicates.append(model_id)
                self._by_id.setdefault(model_id, entry)

    @property
    def default(self) -> ModelEntry:
        return self.entries[0]

    def find(self, model_id: str) -> ModelEntry | None:
        return self._by_id.get(model_id)

    def names(self) -> str:
        return ", ".join(f"'{e.name}'" for e in self.entries)

    def pick(self, model, kind: str) -> ModelEntry:
        """The model a request names (or the first of `kind`); 404 unknown, 400 wrong kind."""
        if model is None:
            entry = next((e for e in self.entries if e.kind == kind), self.default)
        elif not isinstance(model, str):
            raise invalid("model must be a string.", "model", "invalid_type")
        else:
            entry = self.find(model)
            if entry is None:
                raise APIError(404, f"The model '{model}' does not exist; this server serves {self.names()}.",
                               param="model", code="model_not_found")
        if entry.kind != kind:
            route = "/v1/embeddings" if kind == "embedding" else "/v1/rerank and /v1/score"
            hint = ""
            if kind == "reranker":  # e.g. a VL reranker with tied embeddings reads as an embedder
                hint = (f" If '{entry.name}' is a reranker, the server must be told: set MODEL_KIND=reranker, or "
                        f"\"kind\": \"reranker\" in its MODELS entry.")
            raise invalid(
                f"The model '{entry.name}' is {'a reranker' if entry.kind == 'reranker' else 'an embedding model'}; "
                f"{route} need{'s' if kind == 'embedding' else ''} {'an embedding model' if kind == 'embedding' else 'a reranker'}."
                + hint,
                "model", "wrong_model_kind",
            )
        return entry
