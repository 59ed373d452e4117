"""The LLM gateway: OpenAI-compatible chat completions with a prompt cache and cost accounting."""
