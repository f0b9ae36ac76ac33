"""Left-to-right layered drawing of a graph template's DAG (pure code).

Nodes go into columns by their longest path from a source, so every edge points
right; within a column they are ordered by the mean row of their predecessors,
which keeps edges short and mostly straight. The result is bounded by the size of
the template, never by the number of states of a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from state_manager.domain.models import NodeTemplate

BOX_WIDTH = 220
BOX_HEIGHT = 92
COLUMN_GAP = 90
ROW_GAP = 28
MARGIN = 16


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    unites: bool = False  # a fan-in declaration rather than a ``next_nodes`` edge


@dataclass(frozen=True)
class Placed:
    """A node's column, row and top-left corner in pixels."""

    identifier: str
    column: int
    row: int
    x: int
    y: int


@dataclass(frozen=True)
class PlacedEdge:
    edge: Edge
    path: str  # SVG path data from the source's right side to the target's left side


@dataclass(frozen=True)
class Layout:
    nodes: dict[str, Placed]
    edges: list[PlacedEdge]
    width: int
    height: int


def template_edges(nodes: Sequence[NodeTemplate]) -> list[Edge]:
    """``next_nodes`` edges and dashed ``unites`` edges (target → uniting node)."""
    known = {node.identifier for node in nodes}
    edges: list[Edge] = []
    for node in nodes:
        for successor in node.successors():
            if successor in known:
                edges.append(Edge(node.identifier, successor))
    for node in nodes:
        if node.unites is not None and node.unites.identifier in known:
            edges.append(Edge(node.unites.identifier, node.identifier, unites=True))
    return edges


def columns(identifiers: Sequence[str], edges: Sequence[Edge]) -> dict[str, int]:
    """Longest-path column of every node; nodes on a cycle (never valid) go last."""
    incoming: dict[str, int] = dict.fromkeys(identifiers, 0)
    outgoing: dict[str, list[str]] = {i: [] for i in identifiers}
    for edge in edges:
        if edge.source in incoming and edge.target in incoming and edge.source != edge.target:
            outgoing[edge.source].append(edge.target)
            incoming[edge.target] += 1
    column = dict.fromkeys(identifiers, 0)
    ready = [i for i in identifiers if incoming[i] == 0]
    seen: set[str] = set()
    while ready:
        current = ready.pop(0)
        seen.add(current)
        for target in outgoing[current]:
            column[target] = max(column[target], column[current] + 1)
            incoming[target] -= 1
            if incoming[target] == 0:
                ready.append(target)
    last = max(column.values(), default=0) + 1
    for identifier in identifiers:
        if identifier not in seen:
            column[identifier] = last
    return column


def _after_branches(identifiers: Sequence[str], edges: Sequence[Edge]) -> list[Edge]:
    """Ordering-only edges that put a uniting node after every node below its target.

    A ``unites`` node runs once everything below its target has finished, so it is
    drawn to the right of all of it rather than next to the target's successors.
    """
    below: dict[str, list[str]] = {i: [] for i in identifiers}
    for edge in edges:
        if edge.source in below and edge.target in below:
            below[edge.source].append(edge.target)

    def reachable(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for nxt in below[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    extra: list[Edge] = []
    for edge in edges:
        if edge.unites and edge.source in below and edge.target in below:
            after_uniting = reachable(edge.target) | {edge.target}
            for node in reachable(edge.source) - after_uniting:
                extra.append(Edge(node, edge.target))
    return extra


def layout(identifiers: Sequence[str], edges: Sequence[Edge]) -> Layout:
    """Place ``identifiers`` (in template order) and route ``edges`` between them."""
    column = columns(identifiers, [*edges, *_after_branches(identifiers, edges)])
    predecessors: dict[str, list[str]] = {i: [] for i in identifiers}
    for edge in edges:
        if edge.source in column and edge.target in predecessors:
            predecessors[edge.target].append(edge.source)
    order = {identifier: index for index, identifier in enumerate(identifiers)}
    by_column: dict[int, list[str]] = {}
    for identifier in identifiers:
        by_column.setdefault(column[identifier], []).append(identifier)
    row: dict[str, float] = {}
    for index in sorted(by_column):
        members = by_column[index]

        def weight(identifier: str) -> tuple[float, int]:
            rows = [row[p] for p in predecessors[identifier] if p in row]
            mean = sum(rows) / len(rows) if rows else float(order[identifier])
            return (mean, order[identifier])

        members.sort(key=weight)
        for position, identifier in enumerate(members):
            row[identifier] = float(position)
    placed = {
        identifier: Placed(
            identifier=identifier,
            column=column[identifier],
            row=int(row[identifier]),
            x=MARGIN + column[identifier] * (BOX_WIDTH + COLUMN_GAP),
            y=MARGIN + int(row[identifier]) * (BOX_HEIGHT + ROW_GAP),
        )
        for identifier in identifiers
    }
    routed = [
        PlacedEdge(edge, _path(placed[edge.source], placed[edge.target], edge.unites))
        for edge in edges
        if edge.source in placed and edge.target in placed
    ]
    columns_used = max((p.column for p in placed.values()), default=0) + 1
    rows_used = max((p.row for p in placed.values()), default=0) + 1
    return Layout(
        nodes=placed,
        edges=routed,
        width=2 * MARGIN + columns_used * BOX_WIDTH + (columns_used - 1) * COLUMN_GAP,
        # One more gap at the bottom for edges that run below the last row.
        height=2 * MARGIN + rows_used * BOX_HEIGHT + rows_used * ROW_GAP,
    )


def _path(source: Placed, target: Placed, unites: bool) -> str:
    """SVG path data from the source's right edge to the target's left edge.

    Neighbouring columns get one smooth curve. An edge that skips columns runs in
    the gap below the boxes it passes, so it is never hidden behind one. ``unites``
    edges leave and arrive lower on the boxes than ``next_nodes`` edges.
    """
    offset = BOX_HEIGHT * 3 // 4 if unites else BOX_HEIGHT // 2
    x1, y1 = source.x + BOX_WIDTH, source.y + offset
    x2, y2 = target.x, target.y + offset
    if target.column - source.column <= 1:
        bend = max(COLUMN_GAP // 2, (x2 - x1) // 2)
        return f"M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}"
    lane = max(source.y, target.y) + BOX_HEIGHT + ROW_GAP // 2
    step = COLUMN_GAP // 3
    return (
        f"M{x1},{y1} Q{x1 + step},{y1} {x1 + step},{(y1 + lane) // 2} "
        f"T{x1 + 2 * step},{lane} L{x2 - 2 * step},{lane} "
        f"Q{x2 - step},{lane} {x2 - step},{(lane + y2) // 2} T{x2},{y2}"
    )
