"""LLM weight and KV-cache compression (arrives with its issue)."""
