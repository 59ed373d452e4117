"""The LLM gateway: OpenAI-compatible chat completions with a prompt cache and cost accounting.

``config`` (the ``user_config``), ``chat`` (requests, calls, answers, SSE),
``prompt_cache`` (keys and entries), ``upstream`` (the OpenAI-compatible client and its
errors), ``ledger`` (usage per tenant), ``gateway`` (``ChatGateway`` and its observer):
no Ray in any of them; ``deployment`` is the Ray Serve shell.
"""
