"""The Jinja2 environment of the dashboard: templates, filters and URL helpers."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from state_manager import __version__
from state_manager.dashboard import drawing
from state_manager.dashboard.explain import duration, join_waiting, why_waiting
from state_manager.dashboard.session import Session
from state_manager.dashboard.urls import graph_url, overview_url, run_url, runs_url, static
from state_manager.services.context import iso


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def _short(value: str) -> str:
    return value[:8]


def _number(value: int) -> str:
    return f"{value:,}"


def build_environment() -> Environment:
    environment = Environment(
        loader=PackageLoader("state_manager.dashboard", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(
        {"iso": iso, "duration": duration, "pretty": _pretty, "short": _short, "num": _number}
    )
    environment.globals.update(
        {
            "static": static,
            "overview_url": overview_url,
            "runs_url": runs_url,
            "run_url": run_url,
            "graph_url": graph_url,
            "draw_run": drawing.draw_run,
            "draw_template": drawing.draw_template,
            "status_order": [s.value for s in drawing.STATUS_ORDER],
            "drawing": drawing,
            "why_waiting": why_waiting,
            "join_waiting": join_waiting,
            "version": __version__,
        }
    )
    return environment


def page_context(request: Request, session: Session | None) -> dict[str, Any]:
    """What every page's frame needs: whether someone is signed in and their CSRF token."""
    return {
        "signed_in": session is not None,
        "csrf_token": session.csrf_token if session is not None else "",
        "path": request.url.path,
    }
