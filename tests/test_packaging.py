"""Wheel layout (`providers/` installs as `moa.providers`) and a light `import moa`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "vllm", "llama_cpp", "rich", "openai", "starlette", "uvicorn", "fastapi")
SOURCES = ("pyproject.toml", "README.md", "moa", "providers", "local_engine")


def run(*args: str | Path, cwd: Path) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built offline from a copy of the sources (the shared tree stays clean)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        "--quiet", "-w", work / "dist", src, cwd=work)
    [built] = (work / "dist").glob("*.whl")
    return built


@pytest.mark.slow
def test_wheel_holds_only_the_moa_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"moa"}
    for module in ("moa/providers/registry.py", "moa/providers/openai_compat.py",
                   "moa/providers/http.py", "moa/local_engine/__init__.py",
                   "moa/testing/server.py", "moa/cli/main.py", "moa/bench/tasks/dev.jsonl",
                   "moa/bench/tasks/heldout.jsonl"):
        assert module in names, module
    assert wheel.name.startswith("moa_stack-")


@pytest.mark.slow
def test_wheel_installs_and_imports_outside_the_repo(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", venv,
        cwd=tmp_path)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        "--quiet", wheel, cwd=tmp_path)
    # Dependencies come from this environment, appended after the fresh site-packages.
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                    cwd=tmp_path).strip())
    (site / "zz_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    probe = textwrap.dedent(
        """
        import importlib.util, json
        import moa, moa.providers.registry, moa.providers.openai_compat, moa.testing
        print(json.dumps({
            "moa": moa.__file__,
            "providers": moa.providers.registry.__file__,
            "top_providers": importlib.util.find_spec("providers") is not None,
            "top_local_engine": importlib.util.find_spec("local_engine") is not None,
        }))
        """
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    found = json.loads(run(python, "-c", probe, cwd=outside))
    assert Path(found["moa"]).is_relative_to(site)
    assert Path(found["providers"]) == site / "moa" / "providers" / "registry.py"
    assert not found["top_providers"] and not found["top_local_engine"]
    assert (venv / "bin" / "moa").exists()  # the console script


def test_import_moa_is_light(tmp_path: Path) -> None:
    # What makes `import moa` slow is a heavy dependency imported eagerly; that is checked here.
    # Its time is not: a timing threshold fails on a loaded machine (measure it with
    # `python -X importtime -c "import moa"`).
    probe = textwrap.dedent(
        f"""
        import json, sys
        import moa
        import moa.config, moa.providers.registry
        print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
        """
    )
    assert json.loads(run(sys.executable, "-c", probe, cwd=tmp_path)) == []


def test_every_public_name_resolves_and_is_visible_to_type_checkers() -> None:
    import ast

    import moa

    source = Path(moa.__file__).read_text()
    checked = {
        alias.asname or alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for stmt in node.body
        if isinstance(stmt, ast.ImportFrom)
        for alias in stmt.names
    }
    public = set(moa.__all__) - {"__version__"}
    assert public == checked, public ^ checked
    for name in sorted(public):
        assert getattr(moa, name) is not None
    assert issubclass(moa.MixtureError, moa.MoaError) and issubclass(moa.FinalDelta, moa.Event)
