"""A self-contained HTML evaluation report: challenger against champion, the gate's verdict, the details."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#f4f4f8}td.l,th.l{text-align:left}
td.sample{white-space:pre-wrap;max-width:28em;vertical-align:top}
.pass{color:#176e2c;font-weight:bold}.fail{color:#b3261e;font-weight:bold}small{color:#666}
"""


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def render(
    *,
    title: str,
    decision: Mapping[str, Any],
    challenger: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    context: Mapping[str, str],
) -> str:
    """``challenger`` / ``champion``: :func:`~airflow_llmops.ml.evaluation.evaluate_model` results with a
    ``"source"`` key; ``decision``: the gate's ``passed``, ``message`` and numbers."""
    verdict = "pass" if decision.get("passed") else "fail"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<p class='{verdict}'>Gate: {verdict.upper()}</p><p>{html.escape(str(decision.get('message', '')))}</p>",
        "<table>"
        + "".join(
            f"<tr><th class='l'>{html.escape(k)}</th><td class='l'>{html.escape(v)}</td></tr>"
            for k, v in context.items()
        )
        + "</table>",
    ]
    names = sorted(set(challenger.get("metrics", {})) | set((champion or {}).get("metrics", {})))
    header = "<tr><th class='l'>metric</th><th>challenger</th><th>champion</th><th>change</th></tr>"
    rows = []
    for name in names:
        new = challenger.get("metrics", {}).get(name)
        old = (champion or {}).get("metrics", {}).get(name)
        change = f"{new - old:+.4f}" if isinstance(new, float) and isinstance(old, float) else ""
        rows.append(
            f"<tr><td class='l'>{html.escape(name)}</td><td>{_num(new)}</td><td>{_num(old)}</td><td>{change}</td></tr>"
        )
    parts.append("<h2>Metrics</h2><table>" + header + "".join(rows) + "</table>")
    parts.append(
        f"<p><small>challenger: {html.escape(str(challenger.get('source')))}; champion: "
        f"{html.escape(str((champion or {}).get('source', 'none (first model)')))}</small></p>"
    )
    notes = [f"challenger: {n}" for n in challenger.get("notes") or []]
    notes += [f"champion: {n}" for n in (champion or {}).get("notes") or []]
    if notes:
        parts.append("<ul>" + "".join(f"<li><small>{html.escape(str(n))}</small></li>" for n in notes) + "</ul>")
    if challenger.get("per_label_f1"):
        old_f1 = (champion or {}).get("per_label_f1", {})
        body = "".join(
            f"<tr><td class='l'>{html.escape(label)}</td><td>{f1:.3f}</td><td>{_num(old_f1.get(label, ''))}</td></tr>"
            for label, f1 in challenger["per_label_f1"].items()
        )
        parts.append(
            "<h2>F1 per label</h2><table><tr><th class='l'>label</th><th>challenger</th><th>champion</th></tr>"
            + body
            + "</table>"
        )
    if challenger.get("confusion"):
        labels = challenger["labels"]
        head = "".join(f"<th>{html.escape(str(label))}</th>" for label in labels)
        body = "".join(
            f"<tr><th class='l'>{html.escape(str(label))}</th>" + "".join(f"<td>{n}</td>" for n in row) + "</tr>"
            for label, row in zip(labels, challenger["confusion"], strict=True)
        )
        parts.append(
            "<h2>Challenger confusion (rows: true label, columns: predicted)</h2>"
            f"<table><tr><th></th>{head}</tr>{body}</table>"
        )
    if challenger.get("samples"):
        parts.append(_samples_table(challenger, champion))
    parts.append("</body></html>")
    return "\n".join(parts)


def _cell(text: Any) -> str:
    return f"<td class='l sample'>{html.escape(str(text if text is not None else ''))}</td>"


def _samples_table(challenger: Mapping[str, Any], champion: Mapping[str, Any] | None) -> str:
    """Held-out prompts with their reference and each model's greedy answer (and judge grades when judged), row by
    row: both models answer the same first rows of the split. Every text is escaped."""
    ours = list(challenger["samples"])
    theirs = list((champion or {}).get("samples") or [])
    judged = any("judge" in s for s in ours + theirs)
    head = "".join(f"<th class='l'>{name}</th>" for name in ("#", "prompt", "reference", "challenger answer"))
    if judged:
        head += "<th>judge</th>"
    if theirs:
        head += "<th class='l'>champion answer</th>" + ("<th>judge</th>" if judged else "")
    rows = []
    for index, sample in enumerate(ours):
        cells = [f"<td class='l'>{index + 1}</td>", _cell(sample.get("prompt")), _cell(sample.get("reference"))]
        cells.append(_cell(sample.get("answer")))
        if judged:
            cells.append(f"<td>{_num(sample.get('judge', ''))}</td>")
        if theirs:
            other = theirs[index] if index < len(theirs) else {}
            cells.append(_cell(other.get("answer")))
            if judged:
                cells.append(f"<td>{_num(other.get('judge', ''))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f"<h2>Samples ({len(ours)} held-out prompts, greedy decoding)</h2>"
        f"<table class='samples'><tr>{head}</tr>{''.join(rows)}</table>"
    )
