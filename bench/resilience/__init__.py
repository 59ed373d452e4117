"""Resilience experiments on the benchmark harness (``bench/harness/``): what Keel loses,
and how fast it comes back, under faults and over time. Each is a command:

- ``python -m bench.resilience.chaos_soak``: seeded faults (killed and hung replicas, a
  restarted Redis, a stalled feature store, a version roll) under half of the maximum
  load; every lost or wrong answer recorded.
- ``python -m bench.resilience.gcs_restart``: the head's GCS killed and restarted with
  external Redis storage, as KubeRay runs it, under load.
- ``python -m bench.resilience.soak``: an hour (or ``--duration``) of steady load, every
  process's memory sampled each minute.
- ``python -m bench.resilience.first_request``: how long the first request after ready takes.
- ``python -m bench.resilience.fault_table``: the fault table of the operations docs.

Throughput and latency scenarios stay beside this package, in ``bench/``.
"""
