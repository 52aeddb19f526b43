"""In-process engines: llama.cpp on the CPU (default) and vLLM on a GPU."""
