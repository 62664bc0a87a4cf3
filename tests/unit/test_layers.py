"""The direction of dependencies: fs → cache → backend → loft.protocol ← server.
Nothing imports fs or server but the CLI (loft/cli.py, the composition root)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OURS = {"fs", "cache", "backend", "server", "loft"}

#: what each layer may import of ours ("loft" alone means loft.protocol)
ALLOWED = {
    "fs": {"fs", "cache", "backend", "loft.protocol"},
    "cache": {"cache", "backend", "loft.protocol"},
    "backend": {"backend", "loft.protocol"},
    "server": {"server", "loft.protocol"},
    "loft.protocol": set(),
}


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] in OURS}


def layer_of(module: str) -> str:
    return "loft.protocol" if module.startswith("loft.protocol") else module.split(".")[0]


def test_layers_import_only_downwards():
    problems = []
    for package in ("fs", "cache", "backend", "server"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for module in imports_of(path):
                if layer_of(module) not in ALLOWED[package] and module != "loft":
                    problems.append(f"{path.relative_to(ROOT)} imports {module}")
    for module in imports_of(ROOT / "loft" / "protocol.py"):
        problems.append(f"loft/protocol.py imports {module}")
    assert problems == []


def test_layers_the_server_never_imports_client_code():
    for path in (ROOT / "server").rglob("*.py"):
        assert not {layer_of(m) for m in imports_of(path)} & {"cache", "backend", "fs"}, path


def test_lint_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--quiet", str(ROOT)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
