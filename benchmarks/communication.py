"""Communication per client and round: full-model FedAvg, LoRA in fp32 / fp16 / int8, and split learning.

    benchmarks/protocol.sh fedavg fedavg+fp16 fedavg+int8 fedavg-cluster+split-auto   # the runs (CPU protocol)
    python benchmarks/communication.py [--readme docs/results.md]                     # the table

Every LoRA and split number is counted from the real messages of a committed protocol run
(``benchmarks/results/protocol/<label>-s42/rounds.json``): ``bytes-received`` (train replies; evaluation replies
carry no arrays) and ``bytes-sent`` (train and evaluation messages), divided by the 12 clients. Full-model
FedAvg is computed, not run: every parameter of the MiniLM-L6 classifier in fp32, once down and once up.
The accuracy cost of a wire format (or of split learning) is its mean main metric against the same method's
fp32 run without split (goal for int8: <= 0.5 pt).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "benchmarks" / "results" / "protocol"
OUT = ROOT / "benchmarks" / "results" / "communication"
#: (label, run, the run it is compared with: the same method without the change)
RUNS = [
    ("LoRA fp32 (FedAvg)", "fedavg-s42", "fedavg-s42"),
    ("LoRA fp16 (FedAvg)", "fedavg+fp16-s42", "fedavg-s42"),
    ("LoRA int8 (FedAvg)", "fedavg+int8-s42", "fedavg-s42"),
    ("split learning, cut auto (FedAvg-cluster)", "fedavg-cluster+split-auto-s42", "fedavg-cluster-s42"),
]


def _metric(name: str) -> float | None:
    rounds = PROTOCOL / name / "rounds.json"
    return json.loads(rounds.read_text())[-1]["mean-main-metric"] if rounds.is_file() else None


def full_model_bytes() -> int:
    """fp32 bytes of every parameter of the protocol's classifier (MiniLM-L6 backbone + a 2-class head)."""
    sys.path.insert(0, str(ROOT))
    from atlas_flwr.models.classifier import LoraSettings, build_classifier

    model = build_classifier("minilm-l6", 2, LoraSettings(rank=8))
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) * 4


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, help="markdown file whose communication section gets the table")
    readme = parser.parse_args().readme
    full = full_model_bytes()
    rows = [
        {
            "wire": "full-model FedAvg fp32 (computed)",
            "run": "",
            "clients": 12,
            "MB up per client per round": full / 1e6,
            "MB down per client per round": full / 1e6,
            "mean main metric": "",
            "vs same method without it (pt)": "",
        }
    ]
    for label, name, reference_name in RUNS:
        run = PROTOCOL / name
        if not (run / "summary.json").is_file():
            print(f"skipping {name}: no committed run in {run}", file=sys.stderr)
            continue
        rounds = json.loads((run / "rounds.json").read_text())
        summary = json.loads((run / "summary.json").read_text())
        clients = summary["clients"]
        metric = rounds[-1]["mean-main-metric"]
        reference = _metric(reference_name)
        rows.append(
            {
                "wire": label,
                "run": f"protocol/{name}",
                "clients": clients,
                "MB up per client per round": sum(r["bytes-received"] for r in rounds) / len(rounds) / clients / 1e6,
                "MB down per client per round": sum(r["bytes-sent"] for r in rounds) / len(rounds) / clients / 1e6,
                "mean main metric": round(metric, 4),
                "vs same method without it (pt)": "" if reference is None else round(100 * (metric - reference), 2),
            }
        )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "communication.json").write_text(json.dumps(rows, indent=2) + "\n")
    with (OUT / "communication.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| wire | MB up / client / round | MB down / client / round | mean main metric | vs the same method (pt) |"
    ]
    lines.append("|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['wire']} | {r['MB up per client per round']:.3f} | {r['MB down per client per round']:.3f} | "
            f"{r['mean main metric']} | {r['vs same method without it (pt)']} |"
        )
    text = "\n".join(lines) + "\n"
    (OUT / "communication.md").write_text(text)
    print(text)
    if readme is not None:  # the table between the file's <!-- atlas-report:communication --> markers
        from atlas_tools.report import write_sections

        write_sections(readme, {"communication": text})


if __name__ == "__main__":
    main()
