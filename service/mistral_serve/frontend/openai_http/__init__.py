"""The OpenAI-compatible HTTP door (see app.py and docs/openai.md)."""
