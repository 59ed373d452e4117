# Keel's two set-up commands (see README):  make demo  |  make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install prepare lint bench clean protos

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

prepare: $(STAMP)
	$(BIN)/keel prepare

# Ray Serve's throughput-optimised mode (direct ingress, gRPC between deployments) with
# HAProxy on port 8000: 3-4x the Python proxy here (docs/benchmarks/). Set to 0 to compare.
SERVE_ENV ?= RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1

## Run the demo cluster: install, build the demo models, serve them on :8000.
demo: prepare
	$(BIN)/keel check-config serve_config.yaml
	PATH=$(CURDIR)/$(BIN):$$PATH $(SERVE_ENV) $(BIN)/keel serve serve_config.yaml

## Run the whole test suite (lint, types, unit, Ray Serve, end-to-end).
test: $(STAMP)
	$(BIN)/ruff check deployments graph tests bench
	$(BIN)/mypy
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(or $(TMPDIR),/tmp)/keel-site
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check deployments graph tests bench
	$(BIN)/mypy

bench: prepare
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.serving_core

clean:
	rm -rf $(VENV) models/risk_mlp models/risk_gbdt models/risk_mlp_int8 models/.demo-build.json models/.demo-candidates.json

## Compile the gRPC protocol's .proto into the descriptor set Keel loads (after editing it).
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Ideployments/ingress/grpc/proto \
		--descriptor_set_out=deployments/ingress/grpc/proto/grpc_predict_v2.binpb \
		deployments/ingress/grpc/proto/grpc_predict_v2.proto
