"""Keel's storage layer: Redis clients, the in-process LRU and the tiered byte store over
both, with pipelining, timeouts and failure counting. No Ray here.

Every Redis user builds on it: the prediction cache (``deployments/cache/``), the LLM
prompt cache and usage ledger (``deployments/llm/``) and the payload log
(``deployments/ingress/rollout/payload_log.py``).
"""
