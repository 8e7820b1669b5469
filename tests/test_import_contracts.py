"""Dependencies point one way: the import contracts in pyproject.toml ([tool.importlinter]) hold.

The engine imports no service code and no web, database or queue stack; the API side never
imports the worker's run code (it enqueues by task name); the settings import no domain.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_import_contract_is_kept():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
