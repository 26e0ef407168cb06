"""The framework-overhead table of docs/results.md, from the committed ``overhead.json`` files.

    python benchmarks/overhead_table.py [--readme docs/results.md]

Each row is one run of ``benchmarks/overhead.py``: on this machine (2 cores, 2 or 1 client threads) and on
a lent 16-core H200 machine (``benchmarks/overhead_device.sh``: 2 CPU threads, and the GPU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Result folders under benchmarks/results/overhead, in table order.
RUNS = (".", "threads-1", "h200-16cores-cpu", "h200-gpu")


def _where(result: dict) -> str:
    machine = result.get("machine", {})
    where = f"{machine.get('cpus', '?')} cores"
    if result.get("device") == "cuda":
        return f"{where}, {machine.get('gpu', 'GPU')}"
    return f"{where}, CPU, {result.get('threads', 2)} thread(s)"


def _seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def table(root: Path) -> str:
    """One markdown row per overhead.json under ``root``."""
    lines = [
        (
            "| where the client trains | round s, plain loop | round s, `flwr run` | client training s from round 2, "
            "plain / `flwr run` | ratio, all rounds | ratio from round 2 | server phases in the round |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for name in RUNS:
        path = root / name / "overhead.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        plain_train = sum(r["plain-client-train-seconds"][1:])
        flwr_train = sum(r["flwr-client-train-seconds"][1:])
        lines.append(
            f"| {_where(r)} | {_seconds(r['plain-round-seconds'])} | {_seconds(r['flwr-round-seconds'])} | "
            f"{plain_train:.1f} / {flwr_train:.1f} | {r['ratio-all-rounds']:.2f} | {r['ratio-rounds-2-on']:.2f} | "
            f"{100 * r['server-phase-share']:.2f} % |"
        )
    return "\n".join(lines)


def main() -> None:
    """Print the table; with ``--readme``, write it between the file's overhead markers."""
    from atlas_tools.report import write_sections

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=ROOT / "benchmarks/results/overhead", type=Path)
    parser.add_argument("--readme", type=Path, help="markdown file whose overhead section gets the table")
    args = parser.parse_args()
    body = table(args.root)
    print(body)
    if args.readme:
        write_sections(args.readme, {"overhead": body})


if __name__ == "__main__":
    main()
