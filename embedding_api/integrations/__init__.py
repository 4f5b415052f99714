"""Client-side adapters for frameworks that call the server (each module imports its framework, so
import the one you use: `from embedding_api.integrations.langchain import EmbeddingAPIReranker`)."""
