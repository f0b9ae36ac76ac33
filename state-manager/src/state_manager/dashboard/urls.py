"""URLs of the dashboard's pages: the deep links people paste into chat."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from state_manager import __version__

STATIC_PREFIX = "/dashboard/static"


def _segment(value: str) -> str:
    return quote(value, safe="")


def _query(query: dict[str, Any]) -> str:
    wanted = {k: v for k, v in query.items() if v not in (None, "", [])}
    return "?" + urlencode(wanted, doseq=True) if wanted else ""


def overview_url(namespace: str) -> str:
    return f"/dashboard/namespaces/{_segment(namespace)}"


def runs_url(namespace: str, **query: Any) -> str:
    return f"/dashboard/namespaces/{_segment(namespace)}/runs{_query(query)}"


def run_url(namespace: str, run_id: str, **query: Any) -> str:
    """A run's page; ``node=`` opens a node's states, ``state=`` one state."""
    return f"/dashboard/namespaces/{_segment(namespace)}/runs/{_segment(run_id)}{_query(query)}"


def graph_url(namespace: str, graph_name: str) -> str:
    return f"/dashboard/namespaces/{_segment(namespace)}/graphs/{_segment(graph_name)}"


def static(path: str) -> str:
    """A vendored or own asset, with the version in the query so upgrades bust caches."""
    return f"{STATIC_PREFIX}/{path}?v={__version__}"
