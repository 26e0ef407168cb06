"""Print the EuroSAT tables of docs/eurosat.md (precisions, PTQ) and draw the accuracy-vs-round figure.

python benchmarks/eurosat_table.py [benchmarks/results/eurosat] [--readme docs/eurosat.md]

Writes eurosat.png there; with ``--readme`` also rewrites the file's ``eurosat-precisions`` and
``eurosat-ptq`` sections (between their ``<!-- atlas-report:... -->`` markers) with the tables.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Run directories in table order: benchmarks/eurosat.sh's runs (flwr run on this CPU), then
#: benchmarks/eurosat_device.sh's (in-process on a lent GPU; their runtime.json says where).
RUNS = ("fp32", "fp16", "int8", "fp16-gpu", "fp32-gpu")


def _where(run: Path) -> str:
    path = run / "runtime.json"
    if not path.is_file():
        return "CPU (2 cores), flwr run"
    return f"{json.loads(path.read_text())['device']}, in-process grid"


def precision_table(root: Path) -> list[str]:
    """One markdown row per run: where it ran, accuracy, rounds, MB per round, time."""
    lines = [
        (
            "| run | where | rounds (stopped by) | test accuracy | best | MB down / up per round | "
            "client train s (mean of clients) | s per round | s end to end |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in RUNS:
        run = root / name
        if not (run / "summary.json").is_file():
            continue
        s = json.loads((run / "summary.json").read_text())
        rounds = [r for r in json.loads((run / "rounds.json").read_text()) if r["round"] > 0]
        per_round = sum(r["round-seconds"] for r in rounds) / max(len(rounds), 1)
        train = sum(r["client-train-seconds"] for r in rounds) / max(len(rounds), 1)
        wall = run / "wall-clock.txt"
        end = wall.read_text().split(":")[1].split("s end")[0].strip() if wall.is_file() else ""
        lines.append(
            f"| {name} | {_where(run)} | {s['rounds-completed']} of {s['rounds-planned']} ({s['stopped-by']}) | "
            f"{s['test-accuracy']:.4f} | {s['best-test-accuracy']:.4f} | "
            f"{s['bytes-sent-per-round'] / 1e6:.2f} / {s['bytes-received-per-round'] / 1e6:.2f} | {train:.1f} | "
            f"{per_round:.0f} | {end} |"
        )
    return lines


def ptq_table(root: Path) -> list[str]:
    """The atlas-ptq comparison as markdown."""
    path = root / "ptq" / "ptq.json"
    if not path.is_file():
        return []
    lines = [
        "| variant | test accuracy | drop (pt) | size (KB) | compression | ms per batch of 64 | wire MB (2 x clients x rounds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in json.loads(path.read_text()):
        lines.append(
            f"| {r['variant']} | {r['test-accuracy']:.4f} | {r['accuracy-drop-pt']:.2f} | {r['size-bytes'] / 1e3:.1f} | "
            f"{r['compression-ratio']:.2f}x | {r['latency-ms-per-batch']:.1f} | {r['communication-mb']:.1f} |"
        )
    return lines


def figure(root: Path) -> None:
    """Test accuracy per round and per cumulative MB on the wire, one line per precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_round, by_mb) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in RUNS:
        path = root / name / "rounds.json"
        if not path.is_file():
            continue
        rows = json.loads(path.read_text())
        acc = [100 * r["test-accuracy"] for r in rows]
        mb, total = [], 0.0
        for r in rows:
            total += (r.get("bytes-sent") or 0.0) + (r.get("bytes-received") or 0.0)
            mb.append(total / 1e6)
        by_round.plot([r["round"] for r in rows], acc, marker="o", label=name)
        by_mb.plot(mb, acc, marker="o", label=name)
    by_round.set(xlabel="round", ylabel="test accuracy (%)", title="EuroSAT FedAvg, 10 IID clients")
    by_mb.set(xlabel="MB on the wire (down + up, cumulative)", ylabel="test accuracy (%)", title="accuracy per byte")
    for ax in (by_round, by_mb):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(root / "eurosat.png", dpi=120)
    plt.close(fig)


def readme_sections(root: Path) -> dict[str, str]:
    """The docs/eurosat.md sections these results fill, by marker name."""
    return {
        "eurosat-precisions": "\n".join(precision_table(root)),
        "eurosat-ptq": "\n".join(ptq_table(root)) or "(atlas-ptq has not run on these results)",
    }


def main() -> None:
    """Print both tables, write ``eurosat.png``, and fill the file's sections when asked."""
    import argparse

    from atlas_tools.report import write_sections

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="benchmarks/results/eurosat", type=Path)
    parser.add_argument("--readme", type=Path, help="markdown file whose marked sections get the tables")
    args = parser.parse_args()
    sections = readme_sections(args.root)
    print("\n\n".join(sections.values()))
    figure(args.root)
    if args.readme is not None:
        write_sections(args.readme, sections)


if __name__ == "__main__":
    main()
