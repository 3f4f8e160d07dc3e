"""``cxr-bench ablation``: one table from several ``cxr-train evaluate`` reports (a suppression ablation, the
paper's comparison networks): the epochs each run trained, accuracy with its interval, the shortcut baseline,
the gain with its interval, viral and bacterial F1, and the LIME audit, one row per run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxr.runtime.safe_io import atomic_write

SUPPRESSION_KEYS = ("thorax_crop", "clahe", "border_mask")


def _interval(pair: list[float] | None, scale: float = 1.0, sign: bool = False) -> str:
    if not pair:
        return "-"
    form = "{:+.1f}" if sign else "{:.3f}"
    return f"[{form.format(pair[0] * scale)}, {form.format(pair[1] * scale)}]"


def ablation_row(report: dict[str, Any], name: str) -> dict[str, Any]:
    """The numbers one row shows, from one evaluation report."""
    model, intervals = report["model"], report["intervals"]
    pre = report.get("preprocessing", {})
    steps = [key for key in SUPPRESSION_KEYS if pre.get(key)]
    if report.get("erase_corners"):
        steps.append(f"erase_corners {report['erase_corners']:g}")
    gain = intervals.get("gain_over_baseline", {})
    audit = report.get("lime_audit", {})
    return {
        "run": name,
        "arch": report.get("arch", ""),
        "epochs": report.get("epochs", "-"),
        "suppression": ", ".join(steps) or "none",
        "n": model["n"],
        "accuracy": model["accuracy"],
        "accuracy_interval": intervals["accuracy"],
        "baseline_accuracy": report.get("shortcut_baseline", {}).get("accuracy"),
        "gain_points": gain.get("points"),
        "gain_interval": gain.get("interval_points"),
        "f1_viral": model["per_class"].get("pneumonia_viral", {}).get("f1"),
        "f1_bacterial": model["per_class"].get("pneumonia_bacterial", {}).get("f1"),
        "lime_outside_body": audit.get("positive_weight_outside_body"),
        "lime_images": audit.get("images"),
    }


def ablation_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| run | arch | suppression | epochs | n | accuracy [95 %] | shortcut baseline | gain, points [95 %] "
        "| F1 viral | F1 bacterial | LIME + weight outside body |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = "-" if r["baseline_accuracy"] is None else f"{r['baseline_accuracy']:.3f}"
        gain = (
            "-"
            if r["gain_points"] is None
            else f"{r['gain_points']:+.1f} {_interval(r['gain_interval'], 1, True)}"
        )
        lime = (
            "-"
            if r["lime_outside_body"] is None
            else f"{100 * r['lime_outside_body']:.1f} % ({r['lime_images']})"
        )
        lines.append(
            f"| {r['run']} | {r['arch']} | {r['suppression']} | {r['epochs']} | {r['n']} "
            f"| {r['accuracy']:.3f} {_interval(r['accuracy_interval'])} | {base} | {gain} "
            f"| {r['f1_viral']:.3f} | {r['f1_bacterial']:.3f} | {lime} |"
        )
    return "\n".join(lines)


def epochs_trained(run: Path, asked: int | None) -> str:
    """``15 of 30 (time budget)``: a run cut short trained a different schedule, and the table must say so;
    ``(time budget, annealed)`` when the schedule followed the clock and decayed within the budget."""
    metrics = run / "metrics.json"
    if not metrics.is_file():
        return "-"
    facts = json.loads(metrics.read_text())
    history = facts.get("history", [])
    trained = len(history)
    paced = bool(history) and history[-1].get("paced_by_budget", False)
    reason = f" ({facts['stop_reason']}{', annealed' if paced else ''})" if facts.get("stop_reason") else ""
    return f"{trained} of {asked}{reason}" if asked else f"{trained}{reason}"


def run_ablation(reports: list[Path], out: Path, title: str = "Shortcut-suppression ablation") -> str:
    """Read each ``evaluation.json`` (its run folder names the row), write the markdown table and its JSON."""
    rows = []
    for path in reports:
        report = json.loads(Path(path).read_text())
        card = Path(report.get("run", "")) / "card.json"
        if card.is_file():
            facts = json.loads(card.read_text())
            report.setdefault("arch", facts.get("arch", ""))
            report.setdefault("erase_corners", facts.get("training", {}).get("erase_corners", 0))
            report.setdefault("epochs", epochs_trained(card.parent, facts.get("training", {}).get("epochs")))
        rows.append(ablation_row(report, Path(report.get("run", path.parent)).name))
    text = f"# {title}\n\n{ablation_table(rows)}\n"
    atomic_write(out, text)
    atomic_write(out.with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
    return text
