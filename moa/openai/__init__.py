"""The OpenAI wire format, the OpenAI-compatible server and the client wrapper."""
