"""No pickle anywhere: checkpoints, messages and results are safetensors, Flower records, JSON or CSV."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("atlas_flwr", "strategies", "benchmarks", "scripts", "notebooks")
FORBIDDEN = re.compile(
    r"^\s*(import|from)\s+(pickle|cPickle|dill|cloudpickle|joblib)\b|\bpickle\.(load|dump)s?\(", re.MULTILINE
)
TORCH_LOAD = re.compile(r"\btorch\.load\(([^)]*)\)")


def _sources() -> list[Path]:
    files = [p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 20, "the scan found too few files: did the layout change?"
    return files


def test_no_pickle_import_or_call() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in _sources() if FORBIDDEN.search(p.read_text())]
    assert offenders == []


def test_torch_load_only_with_weights_only() -> None:
    offenders = []
    for path in _sources():
        for call in TORCH_LOAD.finditer(path.read_text()):
            if "weights_only=True" not in call.group(1):
                offenders.append(f"{path.relative_to(ROOT)}: torch.load({call.group(1)})")
    assert offenders == []


def test_the_scan_would_catch_an_offender() -> None:
    assert FORBIDDEN.search("import pickle\n") and FORBIDDEN.search("x = pickle.loads(b)")
    assert not FORBIDDEN.search("# no pickle here\nsafetensors.torch.load_file(p)")
    bad = TORCH_LOAD.search("state = torch.load(path, map_location='cpu')")
    assert bad and "weights_only=True" not in bad.group(1)
