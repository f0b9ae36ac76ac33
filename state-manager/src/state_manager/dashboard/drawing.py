"""Turn a graph template, or a run's view, into boxes and edges to draw (pure code).

A run is drawn as its template: one box per node, carrying the node's states
counted by status, a status bar, and, when the node has only a few states, one
clickable dot per state. So a run of 10,000 states draws as many boxes as its
template has nodes; the siblings of a fan-out are one box marked "fan-out of N".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from state_manager.dashboard import layout
from state_manager.dashboard.urls import run_url
from state_manager.domain.buckets import FAILED_STATUSES, PENDING_STATUSES
from state_manager.domain.models import GraphSpec, StateStatus
from state_manager.services.views import NodeBox, RunView

# Order of statuses in bars and legends: finished well, in flight, then trouble.
STATUS_ORDER = (
    StateStatus.SUCCESS,
    StateStatus.PRUNED,
    StateStatus.EXECUTED,
    StateStatus.QUEUED,
    StateStatus.CREATED,
    StateStatus.RETRY_CREATED,
    StateStatus.CANCELLED,
    StateStatus.NEXT_CREATED_ERROR,
    StateStatus.ERRORED,
)
BAR_X = 12
BAR_Y = 44
CAPTION_Y = 66
DOT_Y = 79
BAR_WIDTH = layout.BOX_WIDTH - 2 * BAR_X
DOT_RADIUS = 6
DOT_GAP = 16


@dataclass(frozen=True)
class Segment:
    status: str
    x: int
    width: int
    count: int


@dataclass(frozen=True)
class Dot:
    state_id: str
    status: str
    cx: int
    cy: int
    href: str
    selected: bool


@dataclass
class Box:
    identifier: str
    node_name: str
    x: int
    y: int
    href: str | None
    tone: str  # overall look: idle, running, success, failed
    caption: str
    unites: str | None  # the target of a ``unites``, drawn as "⋈ target"
    unites_title: str | None
    segments: list[Segment] = field(default_factory=list)
    dots: list[Dot] = field(default_factory=list)


@dataclass(frozen=True)
class Line:
    path: str
    kind: str  # "next", "unites" or "fanout"


@dataclass(frozen=True)
class Drawing:
    width: int
    height: int
    boxes: list[Box]
    lines: list[Line]


def segments(counts: Mapping[str, int], width: int = BAR_WIDTH) -> list[Segment]:
    """Split a bar of ``width`` pixels by status; every present status gets ≥ 2 px."""
    present = [(s.value, counts.get(s.value, 0)) for s in STATUS_ORDER if counts.get(s.value, 0)]
    total = sum(count for _, count in present)
    if total == 0:
        return []
    minimum = 2
    spare = width - minimum * len(present)
    found: list[Segment] = []
    x = 0
    for index, (status, count) in enumerate(present):
        last = index == len(present) - 1
        w = width - x if last else minimum + max(spare, 0) * count // total
        found.append(Segment(status=status, x=BAR_X + x, width=w, count=count))
        x += w
    return found


def tone(counts: Mapping[str, int]) -> str:
    """The look of a box: nothing yet, in flight, failed somewhere, or all done."""
    if not any(counts.values()):
        return "idle"
    if any(counts.get(s.value, 0) for s in PENDING_STATUSES):
        return "running"
    if any(counts.get(s.value, 0) for s in FAILED_STATUSES):
        return "failed"
    return "success"


def _placed(spec: GraphSpec) -> tuple[layout.Layout, list[layout.Edge]]:
    edges = layout.template_edges(spec.nodes)
    return layout.layout([n.identifier for n in spec.nodes], edges), edges


def _unites(spec: GraphSpec, identifier: str) -> tuple[str | None, str | None]:
    """The target of a uniting node, and a longer description for its tooltip."""
    node = spec.node(identifier)
    if node is None or node.unites is None:
        return None, None
    target = node.unites.identifier
    return target, f"unites the fan-out of {target} ({node.unites.strategy.value})"


def draw_template(spec: GraphSpec) -> Drawing:
    """The DAG of a template: ``next_nodes`` edges solid, ``unites`` edges dashed."""
    placed, _edges = _placed(spec)
    boxes = [
        Box(
            identifier=node.identifier,
            node_name=node.node_name,
            x=placed.nodes[node.identifier].x,
            y=placed.nodes[node.identifier].y,
            href=None,
            tone="idle",
            caption=_template_caption(spec, node.identifier),
            unites=_unites(spec, node.identifier)[0],
            unites_title=_unites(spec, node.identifier)[1],
        )
        for node in spec.nodes
    ]
    lines = [Line(path=e.path, kind="unites" if e.edge.unites else "next") for e in placed.edges]
    return Drawing(width=placed.width, height=placed.height, boxes=boxes, lines=lines)


def _template_caption(spec: GraphSpec, identifier: str) -> str:
    node = spec.node(identifier)
    assert node is not None
    if node.unites is not None:
        return node.unites.strategy.value
    return f"{len(node.inputs)} input(s)"


def _caption(box: NodeBox) -> str:
    total = box.counts.total
    if total == 0:
        if box.joins:
            group = box.joins[0]
            done = group.descendants - group.pending
            return f"join: {done:,} of {group.descendants:,} finished"
        return "not started"
    text = f"{total:,} state{'s' if total != 1 else ''}"
    if box.counts.fanout_members:
        text += f" · fan-out of {box.counts.fanout_members + 1:,}"
    return text


def draw_run(view: RunView, selected: str | None = None) -> Drawing:
    """A run over its template: counts, status bars and (for small nodes) state dots;
    the dot of the ``selected`` state (the one open in the panel) stands out."""
    placed, _edges = _placed(view.spec)
    boxes: list[Box] = []
    for node in view.spec.nodes:
        position = placed.nodes[node.identifier]
        info = view.boxes[node.identifier]
        box = Box(
            identifier=node.identifier,
            node_name=node.node_name,
            x=position.x,
            y=position.y,
            href=run_url(view.namespace, view.summary.run_id, node=node.identifier),
            tone=tone(info.counts.statuses),
            caption=_caption(info),
            unites=_unites(view.spec, node.identifier)[0],
            unites_title=_unites(view.spec, node.identifier)[1],
            segments=segments(info.counts.statuses),
        )
        box.dots = _dots(info, position, view, selected)
        boxes.append(box)
    fanned_out = {i for i, b in view.boxes.items() if b.counts.fanout_members}
    lines = [
        Line(
            path=e.path,
            kind="unites"
            if e.edge.unites
            else ("fanout" if e.edge.source in fanned_out else "next"),
        )
        for e in placed.edges
    ]
    return Drawing(width=placed.width, height=placed.height, boxes=boxes, lines=lines)


def _dots(info: NodeBox, position: layout.Placed, view: RunView, selected: str | None) -> list[Dot]:
    """One dot per state, in a row under the status bar (few states only)."""
    return [
        Dot(
            state_id=state.id,
            status=state.status,
            cx=position.x + BAR_X + DOT_RADIUS + index * DOT_GAP,
            cy=position.y + DOT_Y,
            href=run_url(view.namespace, view.summary.run_id, state=state.id),
            selected=state.id == selected,
        )
        for index, state in enumerate(info.states)
    ]
