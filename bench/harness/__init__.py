"""What the benchmark scenarios share.

- servers under test: ``servers`` (a target, its process tree, start, readiness,
  stop), ``network`` (free ports, small HTTP calls), ``local_ray`` (a private Ray
  instance and its stdin control channel), and the processes started as
  ``python -m bench.harness.<module>``: ``keel_server``, ``naive_serve``,
  ``baseline_fastapi``, ``baseline_decide``, ``peer_servers`` (KServe, MLServer),
  ``otlp_sink``; ``cache_keys`` empties a benchmark's Redis keys;
- load: ``http_load`` (closed-loop OIP REST), ``grpc_load`` (its gRPC twin),
  ``decide_load`` (``/v1/decide`` workloads);
- ``statistics``: percentiles, medians over repeats, ratios, batch sizes;
- ``report``: the JSON document of a run, markdown cells, plots, the environment;
- ``options``: the command-line options the scenarios share;
- ``progress``: log lines and a progress bar on stderr.

Nothing is imported here: see ``bench/__init__.py``.
"""
