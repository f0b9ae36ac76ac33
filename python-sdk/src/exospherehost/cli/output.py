"""What the CLI prints: JSON documents for scripts, tables, trees and a progress line for
people. Everything here but :class:`Output` and :class:`Progress` is a pure function of
its arguments."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import click

from ..models import RunDetails, RunGraph, RunGraphNode
from .errors import CliError

__all__ = [
    "STATE_ORDER",
    "Output",
    "Progress",
    "count_summary",
    "progress_line",
    "run_tree",
    "state_json",
    "table",
]

# State statuses in the order people read them: finished well, pending, finished badly.
STATE_ORDER = (
    "SUCCESS",
    "PRUNED",
    "CREATED",
    "QUEUED",
    "EXECUTED",
    "RETRY_CREATED",
    "ERRORED",
    "NEXT_CREATED_ERROR",
)
_COLOURS = {
    "SUCCESS": "green",
    "VALID": "green",
    "PRUNED": "cyan",
    "CREATED": "yellow",
    "QUEUED": "yellow",
    "EXECUTED": "yellow",
    "PENDING": "yellow",
    "RETRY_CREATED": "magenta",
    "ERRORED": "red",
    "NEXT_CREATED_ERROR": "red",
    "FAILED": "red",
    "INVALID": "red",
    "REJECTED": "red",
    "TIMEOUT": "red",
    "CANCELLED": "magenta",
}

Paint = Callable[[str], str]


def plain(text: str) -> str:
    return text


def paint_status(text: str) -> str:
    """``text`` in the colour of the status it names (click strips it off a terminal)."""
    colour = _COLOURS.get(text)
    if colour is None:
        return text
    return click.style(text, fg=colour, bold=True if colour == "red" else None)


class Output:
    """Where results go: ``-o json`` prints one JSON document on stdout; text goes to
    stdout, notes and errors to stderr. Colour only on a terminal, never with NO_COLOR."""

    def __init__(self, fmt: str) -> None:
        self.json_mode = fmt == "json"
        self.colour: bool | None = False if os.environ.get("NO_COLOR") else None

    def data(self, document: Any) -> None:
        click.echo(json.dumps(document, indent=2, ensure_ascii=False))

    def line(self, text: str = "") -> None:
        click.echo(text, color=self.colour)

    def note(self, text: str) -> None:
        """A message for the person at the terminal, on stderr (stdout stays parseable)."""
        click.echo(text, err=True, color=self.colour)

    def error(self, error: CliError) -> None:
        click.echo(
            click.style("error: ", fg="red", bold=True) + error.message, err=True, color=self.colour
        )
        for detail in error.details if len(error.details) > 1 else []:
            click.echo(f"  - {detail}", err=True, color=self.colour)
        if self.json_mode:
            self.data(error.as_json())


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], paint: Paint = plain) -> str:
    """Columns padded to their widest cell; ``paint`` colours each cell after padding."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        cells = [paint(cell) + " " * (w - len(cell)) for cell, w in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def count_summary(counts: Mapping[str, int], paint: Paint = plain) -> str:
    """``SUCCESS 3 · QUEUED 1``: the non-zero counts, in :data:`STATE_ORDER`."""
    names = [s for s in STATE_ORDER if counts.get(s)] + sorted(
        s for s in counts if s not in STATE_ORDER and counts[s]
    )
    return " · ".join(f"{paint(name)} {counts[name]}" for name in names) or "no states"


def progress_line(run: RunDetails, elapsed: float, paint: Paint = plain, width: int = 20) -> str:
    """``[█████░░░] 5/8 states  SUCCESS 5 · QUEUED 3  4s``."""
    total = max(run.total_count, 1)
    filled = round(width * run.finished / total)
    bar = "█" * filled + "░" * (width - filled)
    return (
        f"[{bar}] {run.finished}/{run.total_count} states  "
        f"{count_summary(run.counts, paint)}  {elapsed:.0f}s"
    )


class Progress:
    """A progress line redrawn in place, only when ``stream`` is a terminal."""

    def __init__(self, stream: TextIO | None = None, *, colour: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.colour = colour
        self.drawn = False

    def show(self, text: str) -> None:
        if self.enabled:
            click.echo(f"\r\x1b[K{text}", file=self.stream, nl=False, color=self.colour)
            self.drawn = True

    def close(self) -> None:
        if self.drawn:
            click.echo("", file=self.stream)
            self.drawn = False


def parents_of(graph: RunGraph) -> dict[str, str]:
    """Each state's direct parent state (the run graph's edges)."""
    return {edge.target: edge.source for edge in graph.edges}


def state_json(state: RunGraphNode, parent_id: str | None) -> dict[str, Any]:
    """One state in ``-o json`` output (``run show``, failed states of ``run trigger``)."""
    return {
        "id": state.id,
        "identifier": state.identifier,
        "node_name": state.node_name,
        "status": state.status,
        "retry_count": state.retry_count,
        "error": state.error,
        "parent_id": parent_id,
    }


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def run_tree(graph: RunGraph, paint: Paint = plain) -> list[str]:
    """The states of a run as a tree (each under the state that created it), with status,
    attempt (automatic retries + 1) and the first line of any error, in aligned columns."""
    parents = parents_of(graph)
    known = {state.id for state in graph.nodes}
    children: dict[str | None, list[RunGraphNode]] = {}
    for state in graph.nodes:
        parent = parents.get(state.id)
        children.setdefault(parent if parent in known else None, []).append(state)
    # Depth-first without recursion: (state, prefix of its line, prefix of its children).
    rows: list[tuple[str, RunGraphNode, str]] = []
    stack = [(state, "", "") for state in reversed(children.get(None, []))]
    while stack:
        state, lead, indent = stack.pop()
        kids = children.get(state.id, [])
        rows.append((lead + f"{state.identifier} ({state.node_name})", state, indent))
        for index in range(len(kids) - 1, -1, -1):
            last = index == len(kids) - 1
            stack.append(
                (
                    kids[index],
                    indent + ("└─ " if last else "├─ "),
                    indent + ("   " if last else "│  "),
                )
            )
    label_width = max((len(label) for label, _, _ in rows), default=0)
    status_width = max((len(state.status) for _, state, _ in rows), default=0)
    lines: list[str] = []
    for label, state, indent in rows:
        status = paint(state.status) + " " * (status_width - len(state.status))
        lines.append(
            f"{label.ljust(label_width)}  {status}  attempt {state.retry_count + 1}  {state.id}"
        )
        if state.error:
            bar = "│  " if children.get(state.id) else "   "
            lines.append(f"{indent}{bar}error: {_first_line(state.error)}")
    return lines
