"""``atlas-report``: tables and figures from any set of run directories (methods x seeds).

    atlas-report outputs/run-a outputs/run-b ... --out reports/x
    atlas-report benchmarks/results/protocol --out reports/protocol   # every run below a folder

Writes ``methods.md``/``.csv`` (per-task metrics as mean ± std over seeds, worst client, bytes and
seconds per round, predicted peak memory), ``paired.md``/``.csv`` (each method against a reference
method over matched (seed, client) pairs: mean difference and a Wilcoxon signed-rank test), and
PNG figures: convergence, per-client heatmap, cluster adjacency, rank allocation, and
communication against accuracy. With ``--readme FILE`` it also rewrites the marked section of a
markdown file with a compact table (each task's main metric) and the paired test, so a README's
results are regenerated from the runs, never typed in.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAIN_METRIC = {"sst2": "accuracy", "mrpc": "f1", "cola": "mcc", "qnli": "accuracy", "rte": "accuracy"}
#: Run-config keys that make a run a variant of its strategy's preset, with their default values.
SWITCHES = {
    "clustering": "preset",
    "ranks": "preset",
    "aggregation": "preset",
    "split": "none",
    "precision": "fp32",
    "server-lr": 1.0,
    "server-lr-rule": "fixed",
    "factor-split": "balanced",
    "frozen-layers": "use",
    "over-budget": "shrink",
    "dp-clip": 0.0,
    "dp-noise": 0.0,
    "fingerprint-noise": 0.0,
    "local-epochs-by-task": "",
}
#: Switches a preset sets itself (``atlas-split`` is ``atlas`` with ``split = auto``): no variant at that value.
PRESET_SWITCHES = {"atlas-split": {"split": "auto"}}
#: The Laplacian's graph and input, named together in a label (``atlas+laplacian=median,held``) when either
#: differs from the default, and only when the step runs (``laplacian-eta`` > 0 in the summary). A run made
#: before a switch existed lacks its key and did what the second value says.
LAPLACIAN_SWITCHES = {"laplacian-graph": ("cluster", "median"), "laplacian-input": ("aggregate", "held")}
#: Switches whose value as the run used it is in its summary: a method that does not use one records its
#: neutral value there (no server step without aggregation, no frozen layers without budget ranks).
EFFECTIVE = ("server-lr", "server-lr-rule", "frozen-layers", "over-budget")


@dataclass(frozen=True)
class Run:
    """One run directory, loaded."""

    path: Path
    method: str
    seed: int
    tasks: tuple[str, ...]
    rounds: list[dict[str, Any]]
    clients: list[dict[str, Any]]
    ranks: list[dict[str, Any]]
    adjacency: np.ndarray | None
    clusters: dict[str, Any]
    split: list[dict[str, Any]] = ()  # the cut chosen per client, in split runs

    def over_budget(self) -> int | None:
        """Clients whose predicted peak exceeds their memory budget (of the split client in split runs)."""
        if self.split:
            return sum(0 < c.get("memory-budget-bytes", 0) < c["client-predicted-bytes"] for c in self.split)
        if self.ranks:
            return sum(not x["fits-budget"] for x in self.ranks)
        return None

    def client_main(self) -> dict[int, float]:
        """Each client's final main metric (the one of its task)."""
        return {int(c["client-id"]): float(c[MAIN_METRIC[c["task"]]]) for c in self.clients}


def method_label(run_config: dict[str, Any], effective: dict[str, Any] | None = None) -> str:
    """The strategy, plus every switch set away from its default (``atlas+aggregation=zero-pad``).

    For the :data:`EFFECTIVE` switches the value the run's summary records (``effective``) wins over the
    run config, so a switch the method does not use names no variant.
    """
    label = str(run_config["strategy"])
    for key, default in SWITCHES.items():
        default = PRESET_SWITCHES.get(label, {}).get(key, default)
        value = run_config.get(key, default)
        if key in EFFECTIVE and effective and key in effective:
            value = effective[key]
        if value != default:
            label += f"+{key}={value}"
    laplacian = [str(run_config.get(key, before)) for key, (_, before) in LAPLACIAN_SWITCHES.items()]
    stepped = bool(effective) and float(effective.get("laplacian-eta", 0.0)) > 0
    if stepped and laplacian != [default for default, _ in LAPLACIAN_SWITCHES.values()]:
        label += "+laplacian=" + ",".join(laplacian)
    return label


def load_run(path: Path) -> Run:
    """Read a run directory written by the ServerApp; a missing file is a one-line error."""

    def read(name: str, default: Any = None) -> Any:
        file = path / name
        if not file.is_file():
            if default is not None:
                return default
            raise FileNotFoundError(f"{file} is missing: not a finished ATLAS-FL run directory")
        return json.loads(file.read_text())

    config = read("config.json")["run-config"]
    summary = read("summary.json")  # only finished runs are reported
    adjacency = read("adjacency.json", {})
    return Run(
        path=path,
        method=method_label(config, summary.get("switches")),
        seed=int(config["seed"]),
        tasks=tuple(t.strip() for t in str(config["tasks"]).split(",")),
        rounds=read("rounds.json"),
        clients=read("clients.json"),
        ranks=read("ranks.json", []),
        adjacency=np.array(adjacency["a"]) if adjacency else None,
        clusters=read("clusters.json", {}),
        split=read("split.json", []),
    )


def find_runs(paths: Sequence[Path]) -> list[Run]:
    """Run directories given directly or found below the given folders (by their summary.json)."""
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: expected a run directory or a folder of runs")
        found += [path] if (path / "summary.json").is_file() else sorted(p.parent for p in path.rglob("summary.json"))
    if not found:
        raise FileNotFoundError(f"no run directory (with summary.json) under {', '.join(map(str, paths))}")
    return [load_run(p) for p in found]


def _mean_std(values: Sequence[float]) -> str:
    arr = np.asarray(values, dtype=float)
    return f"{arr.mean():.3f} ± {arr.std(ddof=1):.3f}" if len(arr) > 1 else f"{arr.mean():.3f}"


def _method_order(label: str) -> tuple[int, str]:
    # The presets from the simplest to ATLAS, each followed by its variants; unknown strategies last.
    from strategies.pipeline import PRESETS

    base = label.split("+", 1)[0]
    return (list(PRESETS).index(base) if base in PRESETS else len(PRESETS), label)


def _by_method(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs grouped by method label, the presets' order first."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.method].append(run)
    return dict(sorted(groups.items(), key=lambda item: _method_order(item[0])))


def method_table(runs: Sequence[Run]) -> list[dict[str, str]]:
    """One row per method, over its seeds."""
    rows = []
    for method, group in _by_method(runs).items():
        tasks = group[0].tasks
        row = {"method": method, "seeds": str(len(group))}
        for task in tasks:
            for metric in ("accuracy", "f1", "mcc"):
                row[f"{task} {metric}"] = _mean_std([r.rounds[-1][f"{task}-{metric}"] for r in group])
        row["mean main"] = _mean_std([r.rounds[-1]["mean-main-metric"] for r in group])
        row["worst client"] = _mean_std([min(r.client_main().values()) for r in group])
        row["MB down / round"] = f"{np.mean([np.mean([x['bytes-sent'] for x in r.rounds]) for r in group]) / 1e6:.2f}"
        row["MB up / round"] = f"{np.mean([np.mean([x['bytes-received'] for x in r.rounds]) for r in group]) / 1e6:.2f}"
        row["s / round"] = f"{np.mean([np.mean([x['round-seconds'] for x in r.rounds]) for r in group]):.1f}"
        peaks = [max(x["predicted-peak-bytes"] for x in r.ranks) for r in group if r.ranks]
        row["max predicted peak MB"] = f"{max(peaks) / 1e6:.0f}" if peaks else ""
        over = [n for n in (r.over_budget() for r in group) if n is not None]
        row["clients over budget"] = f"{max(over)}" if over else ""
        rows.append(row)
    return rows


def summary_table(runs: Sequence[Run]) -> list[dict[str, str]]:
    """The README's table: per task only its main metric, then the run-level columns (mean ± std over seeds)."""
    by_method = _by_method(runs)
    rows = []
    for row in method_table(runs):
        tasks = [k.split()[0] for k in row if k.endswith(" accuracy")]
        short = {"method": row["method"], "seeds": row["seeds"], "k / ARI": _clusters(by_method[row["method"]])}
        short |= {f"{t} {MAIN_METRIC[t]}": row[f"{t} {MAIN_METRIC[t]}"] for t in tasks}
        keep = ("mean main", "worst client", "MB down / round", "MB up / round", "s / round", "clients over budget")
        rows.append(short | {k: row[k] for k in keep})
    return rows


def _clusters(group: Sequence[Run]) -> str:
    # k found per seed, and the worst adjusted Rand index against the declared tasks (1.00: exact).
    found = [r.clusters for r in group if r.clusters.get("k") is not None]
    if not found:
        return ""
    ks = "/".join(sorted({str(c["k"]) for c in found}))
    aris = [c["ari-vs-declared-tasks"] for c in found if c.get("ari-vs-declared-tasks") is not None]
    return f"{ks} / {min(aris):.2f}" if aris else ks


def update_section(text: str, name: str, body: str) -> str:
    """``text`` with the lines between ``<!-- atlas-report:NAME -->`` and ``<!-- /atlas-report:NAME -->``
    replaced by ``body``; both markers must be there, once each."""
    begin, end = f"<!-- atlas-report:{name} -->", f"<!-- /atlas-report:{name} -->"
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"expected one {begin} line followed by one {end} line")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body.rstrip()}\n{end}{tail}"


def write_sections(path: Path, sections: dict[str, str]) -> None:
    """Rewrite the marked sections (name -> body) of the markdown file at ``path``; nothing is written
    unless every section's markers are there."""
    text = path.read_text()
    for name, body in sections.items():
        text = update_section(text, name, body)
    path.write_text(text)


def final_scores(runs: Sequence[Run]) -> dict[str, dict[tuple[int, str], float]]:
    """Per method, each (seed, task)'s final main metric (the mean of the task's clients, as each round logs it)."""
    scores: dict[str, dict[tuple[int, str], float]] = defaultdict(dict)
    for run in runs:
        for task in run.tasks:
            scores[run.method][(run.seed, task)] = float(run.rounds[-1][f"{task}-{MAIN_METRIC[task]}"])
    return scores


def paired_table(runs: Sequence[Run], reference: str) -> list[dict[str, str]]:
    """Each method against ``reference`` on (seed, task) pairs: the task's final main metric, mean of its clients.

    The unit is (seed, task), not (seed, client): a task's clients evaluate on the same rows, and under
    FedAvg-like methods with the same model, so per-client pairs repeat one measurement (36 pairs where 12
    are distinct on the protocol). Tasks and seeds are distinct units for every method.
    """
    from scipy.stats import wilcoxon

    scores = final_scores(runs)
    if reference not in scores:
        raise ValueError(f"reference method {reference!r} is not among the runs: {', '.join(sorted(scores))}")
    rows = []
    base = scores[reference]
    for method, values in scores.items():
        if method == reference:
            continue
        keys = sorted(set(values) & set(base))
        diff = np.array([values[k] - base[k] for k in keys])
        p = float("nan")
        if len(diff) >= 2 and np.any(diff != 0):
            p = float(wilcoxon(diff).pvalue)
        rows.append(
            {
                "method": method,
                "reference": reference,
                "pairs (seed, task)": str(len(keys)),
                "mean difference": f"{diff.mean():+.4f}" if len(diff) else "",
                "wins / ties / losses": f"{(diff > 0).sum()} / {(diff == 0).sum()} / {(diff < 0).sum()}",
                "Wilcoxon p": f"{p:.3g}",
            }
        )
    return rows


def gap_table(runs: Sequence[Run], reference: str = "centralized") -> list[dict[str, str]]:
    """Each method's final main metric minus the ``reference``'s, per task (mean over the seeds both have).

    Empty when the reference is not among the runs. "worst task" is the most negative gap.
    """
    by_method = _by_method(runs)
    if reference not in by_method:
        return []

    def per_task(group: Sequence[Run]) -> dict[int, dict[str, float]]:
        return {r.seed: {t: float(r.rounds[-1][f"{t}-{MAIN_METRIC[t]}"]) for t in r.tasks} for r in group}

    base = per_task(by_method[reference])
    rows = []
    for method, group in by_method.items():
        if method == reference:
            continue
        scores = per_task(group)
        seeds = sorted(set(scores) & set(base))
        if not seeds:
            continue
        tasks = group[0].tasks
        gaps = {t: float(np.mean([scores[s][t] - base[s][t] for s in seeds])) for t in tasks}
        row = {"method": method, "seeds": str(len(seeds))}
        row |= {f"{t} {MAIN_METRIC[t]} gap": f"{gaps[t]:+.3f}" for t in tasks}
        row["worst task"] = f"{min(gaps.values()):+.3f}"
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict[str, str]]) -> str:
    """A markdown table of rows with the same keys."""
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r.get(h, "") for h in header) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _csv(rows: Sequence[dict[str, str]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def figures(runs: Sequence[Run], out: Path) -> list[Path]:
    """Draw the PNG figures; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_method[run.method].append(run)
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, group in by_method.items():
        curve = np.mean([[r["mean-main-metric"] for r in run.rounds] for run in group], axis=0)
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=method)
    ax.set(xlabel="round", ylabel="mean of task main metrics", title="Convergence (mean over seeds)")
    ax.legend(fontsize=7)
    written.append(_save(fig, out / "convergence.png"))

    methods = list(by_method)
    clients = sorted({c for run in runs for c in run.client_main()})
    grid = np.array(
        [[np.mean([r.client_main().get(c, np.nan) for r in by_method[m]]) for c in clients] for m in methods]
    )
    fig, ax = plt.subplots(figsize=(max(6, len(clients) * 0.5), 1 + 0.5 * len(methods)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set(xticks=range(len(clients)), xticklabels=clients, yticks=range(len(methods)), yticklabels=methods)
    ax.set(xlabel="client", title="Final main metric per client")
    fig.colorbar(image, ax=ax)
    written.append(_save(fig, out / "clients-heatmap.png"))

    with_graph = next((r for r in runs if r.adjacency is not None), None)
    if with_graph is not None:
        fig, ax = plt.subplots(figsize=(5, 4))
        image = ax.imshow(with_graph.adjacency, cmap="magma")
        ax.set(title=f"Fingerprint graph a_kl ({with_graph.method}, groups {with_graph.clusters.get('groups')})")
        ax.title.set_fontsize(7)
        fig.colorbar(image, ax=ax)
        written.append(_save(fig, out / "adjacency.png"))

    with_ranks = next((r for r in runs if r.ranks and r.ranks[0].get("budget-binds") is not None), None)
    if with_ranks is not None:
        ranks = np.array([[int(x) for x in row["ranks-per-layer"].split()] for row in with_ranks.ranks])
        fig, ax = plt.subplots(figsize=(5, 4))
        image = ax.imshow(ranks, aspect="auto", cmap="Blues")
        labels = [f"{row['client-id']} {row['device']}" for row in with_ranks.ranks]
        ax.set(xlabel="layer", ylabel="client", yticks=range(len(labels)), yticklabels=labels)
        ax.set_title(f"LoRA rank per client and layer ({with_ranks.method})", fontsize=8)
        fig.colorbar(image, ax=ax)
        written.append(_save(fig, out / "ranks.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, group in by_method.items():
        mb = np.mean([np.mean([x["bytes-sent"] + x["bytes-received"] for x in r.rounds]) for r in group]) / 1e6
        acc = np.mean([r.rounds[-1]["mean-main-metric"] for r in group])
        ax.scatter(mb, acc)
        ax.annotate(method, (mb, acc), fontsize=7)
    ax.set(xlabel="MB per round (down + up)", ylabel="final mean main metric", title="Communication against accuracy")
    written.append(_save(fig, out / "communication.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``atlas-report``."""
    parser = argparse.ArgumentParser(prog="atlas-report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories or folders of runs")
    parser.add_argument("--out", type=Path, required=True, help="folder for the tables and figures")
    parser.add_argument("--reference", default="fedavg", help="method the others are compared with")
    parser.add_argument(
        "--readme",
        type=Path,
        help="also write the summary and paired tables into this markdown file, between its "
        "<!-- atlas-report:SECTION --> and <!-- /atlas-report:SECTION --> lines",
    )
    parser.add_argument("--section", default="results", help="the marker name in --readme (default: results)")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.runs)
        methods = method_table(runs)
        references = {r.method for r in runs}
        paired = paired_table(runs, args.reference) if args.reference in references else []
        gaps = gap_table(runs)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"atlas-report: {err}", file=sys.stderr)
        return 2
    if args.readme is not None:
        try:
            body = "\n".join(markdown(rows) for rows in (summary_table(runs), gaps, paired) if rows)
            write_sections(args.readme, {args.section: body})
        except (OSError, ValueError) as err:
            print(f"atlas-report: {args.readme}: {err}", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for stem, rows in (("methods", methods), ("gap", gaps), ("paired", paired)):
        (args.out / f"{stem}.md").write_text(markdown(rows))
        (args.out / f"{stem}.csv").write_text(_csv(rows))
    pngs = figures(runs, args.out)
    print(markdown(methods))
    if paired:
        print(markdown(paired))
    print(f"{len(runs)} runs; tables and {len(pngs)} figures in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
