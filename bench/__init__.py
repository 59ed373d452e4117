"""Keel's benchmarks: a small harness and one module per scenario.

Run a scenario from the repository root as ``python -m bench.<scenario>``:

- ``serving_core``: Keel against a plain FastAPI server and a naive Ray Serve app;
- ``decide``: ``POST /v1/decide``, Keel against one FastAPI process with Keel's cores;
- ``peers``: Keel against KServe, MLServer and FastAPI, OIP REST and gRPC;
- ``observability``: tracing and metrics on vs off, ``/v1/slo`` vs the client;
- ``llm_cache``: what the LLM gateway's prompt cache saves;
- ``autoscale``: a model deployment's replicas under a load step;
- ``soak``: half of Keel's maximum throughput for a long time;
- ``fault_table``: the fault-injection tests' figures as a table;
- ``first_request``: the first requests the moment readiness turns 200;
- ``model_batching``: micro-batching inside one model replica, no HTTP;
- ``grpc_load``: the closed-loop OIP gRPC load generator on its own.

``bench.harness`` holds what they share: the servers under test and how they are
started and stopped, the load generators, the statistics, the reports and plots.
Every scenario writes a JSON document and a PNG (``bench/results`` by default).

This package and ``bench.harness`` import nothing at module level: the peers' own
venvs import ``bench.harness.peer_servers`` and must not need Keel's dependencies.
"""
