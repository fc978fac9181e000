"""The code stays linted, formatted and type-checked (ruff and mypy run as part of the tests),
and its folders keep to their layers."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


def test_ruff_lint() -> None:
    result = subprocess.run([_tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = subprocess.run(
        [_tool("ruff"), "format", "--check", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy() -> None:
    result = subprocess.run(
        [_tool("mypy"), "client", "signaling", "rtc_server", "wav2lip"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Top to bottom: each folder imports only from those below it.
LAYERS = ["client", "signaling", "rtc_server", "wav2lip"]
# The one way up: `lipsync call` is a subcommand of the one `lipsync` command, whose parser
# lives with the server's; it imports the client lazily, when called.
UPWARD = {("signaling/cli.py", "client.call")}


def test_each_folder_imports_only_from_those_below_it() -> None:
    wrong = []
    for rank, layer in enumerate(LAYERS):
        for path in sorted((ROOT / layer).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    where = str(path.relative_to(ROOT))
                    if top in LAYERS[:rank] and (where, name) not in UPWARD:
                        wrong.append(f"{where} imports {name}")
    assert not wrong, wrong
