"""meddiff.anomaly is below the protocols: it never imports up into protocols/, evaluation/ or models/."""

from __future__ import annotations

import ast
from pathlib import Path

import meddiff.anomaly

UPWARD = ("meddiff.protocols", "meddiff.evaluation", "meddiff.models", "meddiff.eval", "meddiff.train")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_anomaly_modules_import_nothing_above_them():
    root = Path(meddiff.anomaly.__file__).parent
    files = sorted(root.glob("*.py"))
    assert len(files) >= 5
    bad = {p.name: sorted(m for m in _imports(p) if m.startswith(UPWARD)) for p in files}
    assert not {k: v for k, v in bad.items() if v}
