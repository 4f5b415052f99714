# Set-up, serve, demo, test and benchmark. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel by default; on a GPU host use e.g. TORCH_SPEC="torch" (or empty to keep an installed torch).
TORCH_SPEC ?= torch==2.13.0
MODEL_PATH ?= $(shell sed -n 's/^MODEL_PATH=//p' .env 2>/dev/null | tail -n 1)
MODEL_PATH := $(or $(MODEL_PATH),./models/Qwen3-VL-Embedding-2B)
DEMO_PATH ?= ./models/demo-random-tiny
DEMO_RERANKER_PATH ?= ./models/demo-random-tiny-reranker

.PHONY: install run demo test bench bench-quick clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

run: install
	@if [ ! -f "$(MODEL_PATH)/config.json" ]; then \
	  echo "No model at $(MODEL_PATH). Download the weights first:"; \
	  echo "  $(BIN)/pip install -U huggingface_hub && $(BIN)/huggingface-cli download Qwen/Qwen3-VL-Embedding-2B --local-dir $(MODEL_PATH)"; \
	  echo "or try the offline demo: make demo"; exit 1; fi
	MODEL_PATH=$(MODEL_PATH) $(BIN)/python -m embedding_api

demo: install
	@test -f $(DEMO_PATH)/config.json || $(BIN)/python -m embedding_api.tools.checkpoint $(DEMO_PATH) --family qwen3_vl --size tiny
	@test -f $(DEMO_RERANKER_PATH)/config.json || $(BIN)/python -m embedding_api.tools.checkpoint $(DEMO_RERANKER_PATH) --family qwen3_vl --size tiny --kind reranker
	@echo "Serving RANDOM-WEIGHT demo checkpoints (an embedder and a reranker): the API is real, the numbers are meaningless."
	MODEL_PATH=$(DEMO_PATH) MODEL_NAME=Qwen3-VL-Embedding-2B \
	  MODELS='[{"name": "Qwen3-VL-Reranker-2B", "path": "$(DEMO_RERANKER_PATH)", "kind": "reranker"}]' \
	  $(BIN)/python -m embedding_api

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m benchmarks.run

bench-quick: install
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
