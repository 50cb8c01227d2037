"""The evaluation report: JSON (the record), a console table, and a bar chart PNG."""

import json
from pathlib import Path


def format_table(report: dict) -> str:
    header = ("task", "metric", "score", "n", "shots", "template", "scoring")
    rows = [header]
    for name, r in report["results"].items():
        template = "chat" if report["chat_template"] else "none"
        rows.append((name, r["metric"], f"{r['score']:.4f}", str(r["n"]), str(r["shots"]), template, r["mode"]))
        if len(r["subtasks"]) > 1:
            for sub, s in sorted(r["subtasks"].items()):
                rows.append((f"  {sub}", r["metric"], f"{s['score']:.4f}", str(s["n"]), "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    methods = [f"{name}: {r['method']}" + (f" (sandbox: {r['extra']['sandbox']})" if "sandbox" in r["extra"] else "")
               for name, r in report["results"].items()]
    return "\n".join(lines + ["", f"{_source(report)}   date: {report['date']}", *methods])


def _source(report: dict) -> str:
    """What was scored: a model, or completions from a samples file."""
    return f"model: {report['model']}" if report["model"] is not None else f"samples: {report['samples']}"


def write_report(report: dict, output: Path) -> list[Path]:
    """Write OUTPUT (JSON) and OUTPUT with .png (chart); returns the paths written."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(output)
    png = output.with_suffix(".png")
    _plot(report, png)
    return [output, png] if png.exists() else [output]


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Bounded scores share one axis; perplexity is in the table and the JSON.
    names = [n for n, r in report["results"].items() if r["metric"] != "perplexity"]
    if not names:
        return
    scores = [report["results"][n]["score"] for n in names]
    labels = [f"{n}\n{report['results'][n]['metric']}, {report['results'][n]['shots']}-shot" for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(names)), 3.6))
    bars = ax.bar(labels, scores, color="#4C72B0")
    ax.bar_label(bars, labels=[f"{s:.3f}" for s in scores])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(f"{Path(report['model'] or report['samples']).name} ({report['date'][:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
