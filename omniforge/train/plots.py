"""The run's loss (and eval scores) over steps, one PNG, stage boundaries marked."""

from __future__ import annotations

import json
from pathlib import Path


def plot_losses(metrics: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [record for record in map(_parsed, metrics.read_text().splitlines()) if record is not None]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    if not steps:
        return
    figure, axes = plt.subplots(2 if evals else 1, 1, figsize=(9, 6 if evals else 3.5), squeeze=False)
    loss_axis = axes[0][0]
    boundaries, stage_start, offset = [], {}, 0
    for stage, records in _segments(steps):  # one after another, each from where the last one ended
        if offset:
            boundaries.append((offset, stage))
        stage_start[stage] = offset - (records[0]["step"] - 1)
        x = [stage_start[stage] + r["step"] for r in records]
        loss_axis.plot(x, [r["loss"] for r in records], lw=1, color="C0")
        offset = x[-1]
    loss_axis.set_ylabel("loss")
    loss_axis.set_yscale("log")
    first = steps[0]["stage"]
    loss_axis.set_title(f"training loss ({first} -> {steps[-1]['stage']})", fontsize=10)
    if evals:
        eval_axis = axes[1][0]
        names = sorted({k for r in evals for k in r["eval"]})
        for name in names:
            points = [(stage_start.get(r["stage"], 0) + r["step"], r["eval"][name]) for r in evals if name in r["eval"]]
            eval_axis.plot(*zip(*points), marker="o", ms=3, label=name)
        eval_axis.set_ylabel("eval score")
        eval_axis.legend(fontsize=8, ncol=4)
    for axis in [a[0] for a in axes]:
        for position, name in boundaries:
            axis.axvline(position, color="grey", ls="--", lw=0.8)
            axis.text(position, axis.get_ylim()[1], f" {name}", fontsize=7, va="top")
        axis.set_xlabel("step (all stages)")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def _segments(steps: list[dict]) -> list[tuple[str, list[dict]]]:
    """The step records by stage, in the order the stages first appear: a stage trained `beside`
    another writes its records among that one's. A stage whose steps start again (run again, or
    resumed from an earlier checkpoint) opens a segment of its own."""
    segments, current = [], {}
    for record in steps:
        records = current.get(record["stage"])
        if records is None or record["step"] <= records[-1]["step"]:
            records = current[record["stage"]] = []
            segments.append((record["stage"], records))
        records.append(record)
    return segments


def _parsed(line: str) -> dict | None:
    """A metrics record; None for a blank line or one a crash tore mid-write (not JSON)."""
    try:
        return json.loads(line) if line.strip() else None
    except ValueError:
        return None
