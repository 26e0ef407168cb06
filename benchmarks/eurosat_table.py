"""Print the README's EuroSAT tables (precisions, PTQ) and draw the accuracy-vs-round figure.

python benchmarks/eurosat_table.py [benchmarks/results/eurosat]   (writes eurosat.png there)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "int8")


def precision_table(root: Path) -> list[str]:
    """One markdown row per precision run: accuracy, rounds, MB per round, time."""
    lines = [
        "| precision | rounds (stopped by) | test accuracy | best | MB down / up per round | s per round | s end to end |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in PRECISIONS:
        run = root / name
        if not (run / "summary.json").is_file():
            continue
        s = json.loads((run / "summary.json").read_text())
        rounds = [r for r in json.loads((run / "rounds.json").read_text()) if r["round"] > 0]
        per_round = sum(r["round-seconds"] for r in rounds) / max(len(rounds), 1)
        wall = run / "wall-clock.txt"
        end = wall.read_text().split(":")[1].split("s end")[0].strip() if wall.is_file() else ""
        lines.append(
            f"| {name} | {s['rounds-completed']} of {s['rounds-planned']} ({s['stopped-by']}) | "
            f"{s['test-accuracy']:.4f} | {s['best-test-accuracy']:.4f} | "
            f"{s['bytes-sent-per-round'] / 1e6:.2f} / {s['bytes-received-per-round'] / 1e6:.2f} | {per_round:.0f} | {end} |"
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
    for name in PRECISIONS:
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


def main() -> None:
    """Print both tables and write ``eurosat.png``."""
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/eurosat")
    print("\n".join(precision_table(root)))
    print()
    print("\n".join(ptq_table(root)))
    figure(root)


if __name__ == "__main__":
    main()
