# Set-up, serve, demo, test and benchmark. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, on its own. On PyPI, `torch==2.13.0` on Linux x86-64 is the CUDA build
# (several GB of nvidia-* packages). On a host without an NVIDIA GPU, `make install` therefore adds
# PyTorch's CPU wheel index (TORCH_CPU_INDEX) as an extra index when it answers, and pip takes
# 2.13.0+cpu from it (PEP 440 ranks +cpu above the plain version). When that index cannot be
# reached, pip uses only its configured indexes: on a stock PyPI that is the CUDA build; a host
# with a local wheel directory gets what is there. A GPU host gets the CUDA build from PyPI.
# The decision is printed (python -m embedding_api.tools.torch_wheel). TORCH_CPU_INDEX= turns the
# extra index off; TORCH_SPEC="torch" takes the newest torch; TORCH_SPEC= keeps an installed torch.
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
MODEL_PATH ?= $(shell sed -n 's/^MODEL_PATH=//p' .env 2>/dev/null | tail -n 1)
MODEL_PATH := $(or $(MODEL_PATH),./models/Qwen3-VL-Embedding-2B)
DEMO_PATH ?= ./models/demo-random
DEMO_RERANKER_PATH ?= ./models/demo-random-tiny-reranker
# The demo has no API key: it listens on the loopback address unless HOST (environment, command line
# or .env) says otherwise.
DEMO_HOST := $(or $(HOST),$(shell sed -n 's/^HOST=//p' .env 2>/dev/null | tail -n 1),127.0.0.1)

# `run` and `demo` exec the server in place of the recipe's shell: make's own child is then the server
# itself, so a SIGTERM to make (which GNU make passes on to its children) reaches it, and it drains.

.PHONY: install run demo test bench bench-quick bench-peer bench-peer-setup bench-vllm bench-vllm-setup clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then \
	  $(BIN)/python -m pip install -q "$(TORCH_SPEC)" \
	    $$(TORCH_CPU_INDEX="$(TORCH_CPU_INDEX)" $(BIN)/python -m embedding_api.tools.torch_wheel); fi
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

run: install
	@if [ ! -f "$(MODEL_PATH)/config.json" ]; then \
	  echo "No model at $(MODEL_PATH)."; \
	  $(BIN)/python -m embedding_api.tools.download "$(MODEL_PATH)" --bin $(BIN); \
	  echo "or try the offline demo: make demo"; exit 1; fi
	MODEL_PATH=$(MODEL_PATH) exec $(BIN)/python -m embedding_api

demo: install
	@test -f $(DEMO_PATH)/config.json || $(BIN)/python -m embedding_api.tools.checkpoint $(DEMO_PATH) --family qwen3_vl --size demo
	@test -f $(DEMO_RERANKER_PATH)/config.json || $(BIN)/python -m embedding_api.tools.checkpoint $(DEMO_RERANKER_PATH) --family qwen3_vl --size tiny --kind reranker
	@echo "Serving RANDOM-WEIGHT demo checkpoints (an embedder with the 2B's 2048-dim output, and a reranker): the API is real, the numbers are meaningless."
	@echo "The demo listens on $(DEMO_HOST)$(if $(filter 127.0.0.1 localhost ::1,$(DEMO_HOST)), (this machine only; HOST=0.0.0.0 make demo listens on every interface), as HOST says; it has no API key)."
	HOST=$(DEMO_HOST) MODEL_PATH=$(DEMO_PATH) MODEL_NAME=Qwen3-VL-Embedding-2B \
	  MODELS='[{"name": "Qwen3-VL-Reranker-2B", "path": "$(DEMO_RERANKER_PATH)", "kind": "reranker"}]' \
	  exec $(BIN)/python -m embedding_api

# The suite runs its test files on TEST_WORKERS processes (pytest-xdist, one file per worker at a time,
# so a file's servers are started once); TEST_WORKERS=1 runs it in this process, one file after another.
TEST_WORKERS ?= 2

test: install
	$(BIN)/python -m pytest -q $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

bench: install
	$(BIN)/python -m benchmarks.run

bench-quick: install
	$(BIN)/python -m benchmarks.run --quick

# Side by side with the peers, each in its own virtual environment, created once by bench-peer-setup
# (or one at a time: bench-vllm-setup); never part of `make test`. Infinity (benchmarks/peer.py,
# benchmarks/.peer-venv), then vLLM's CPU build (benchmarks/peer_vllm.py, benchmarks/.vllm-venv).
bench-peer: install
	$(BIN)/python -m benchmarks.peer
	$(BIN)/python -m benchmarks.peer_vllm

bench-peer-setup: install
	$(BIN)/python -m benchmarks.peer --setup
	$(BIN)/python -m benchmarks.peer_vllm --setup

bench-vllm: install
	$(BIN)/python -m benchmarks.peer_vllm

bench-vllm-setup: install
	$(BIN)/python -m benchmarks.peer_vllm --setup

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
