"""Remote backends (OpenAI-compatible, Anthropic) behind one async interface."""
