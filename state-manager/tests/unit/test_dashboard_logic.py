"""The dashboard's pure logic: sessions, redirect targets, layout, drawing, explanations."""

from __future__ import annotations

import pytest
from state_manager.dashboard import drawing, explain, layout, session
from state_manager.dashboard.routes import trigger_request
from state_manager.domain.models import NodeTemplate, UnitesStrategy
from state_manager.errors import InvalidRequest
from state_manager.services.views import Registration
from state_manager.store.queries import FaninGroup, StateBrief

KEY = session.signing_key("api-key", "encryption-key")
NOW = 1_800_000_000


def test_a_session_cookie_round_trips_until_it_expires() -> None:
    signer = session.Signer(KEY)
    issued, cookie = signer.new_session(NOW, 3600)
    assert signer.session(cookie, NOW + 3599) == issued
    assert signer.session(cookie, NOW + 3600) is None
    assert len(issued.csrf_token) >= 32


@pytest.mark.parametrize(
    "mangle",
    [
        lambda c: c[:-2] + ("AA" if not c.endswith("AA") else "BB"),  # signature changed
        lambda c: "e" + c[1:] if c[0] != "e" else "f" + c[1:],  # payload changed
        lambda c: c.replace(".", ""),
        lambda c: c + ".x",
        lambda c: "",
    ],
)
def test_a_changed_cookie_is_refused(mangle: object) -> None:
    signer = session.Signer(KEY)
    _issued, cookie = signer.new_session(NOW, 3600)
    assert callable(mangle)
    assert signer.session(mangle(cookie), NOW) is None


def test_cookies_of_another_key_or_kind_are_refused() -> None:
    _issued, cookie = session.Signer(KEY).new_session(NOW, 3600)
    rotated = session.Signer(session.signing_key("new-api-key", "encryption-key"))
    assert rotated.session(cookie, NOW) is None  # changing the API key signs everyone out
    nonce, login_cookie = session.Signer(KEY).new_login_nonce(NOW)
    assert session.Signer(KEY).session(login_cookie, NOW) is None
    assert not session.Signer(KEY).login_nonce_ok(cookie, nonce, NOW)


def test_login_nonce_is_double_submitted_and_expires() -> None:
    signer = session.Signer(KEY)
    nonce, cookie = signer.new_login_nonce(NOW)
    assert signer.login_nonce_ok(cookie, nonce, NOW + 60)
    assert not signer.login_nonce_ok(cookie, nonce + "x", NOW)
    assert not signer.login_nonce_ok(None, nonce, NOW)
    assert not signer.login_nonce_ok(cookie, nonce, NOW + session.LOGIN_NONCE_SECONDS)


def test_csrf_and_key_checks() -> None:
    issued, _cookie = session.Signer(KEY).new_session(NOW, 60)
    assert session.csrf_ok(issued, issued.csrf_token)
    assert not session.csrf_ok(issued, None)
    assert not session.csrf_ok(issued, issued.csrf_token[:-1])
    assert session.api_key_matches("k€y", "k€y")
    assert not session.api_key_matches("key", "key ")


@pytest.mark.parametrize(
    ("origin", "referer", "ok"),
    [
        ("http://127.0.0.1:8000", None, True),
        ("https://127.0.0.1:8000", None, True),  # behind a TLS proxy: hosts are compared
        ("http://evil.example", None, False),
        ("http://127.0.0.1:9", None, False),
        ("null", None, False),
        (None, "http://127.0.0.1:8000/dashboard/x", True),
        (None, "http://evil.example/dashboard/x", False),
        (None, None, True),  # no header: the CSRF token still decides
    ],
)
def test_same_origin(origin: str | None, referer: str | None, ok: bool) -> None:
    assert session.same_origin(origin, referer, "127.0.0.1:8000") is ok


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/dashboard/namespaces/a/runs?page=2", "/dashboard/namespaces/a/runs?page=2"),
        ("/dashboard", "/dashboard"),
        (None, "/dashboard/"),
        ("https://evil.example/dashboard/", "/dashboard/"),
        ("//evil.example/dashboard/", "/dashboard/"),
        ("/\\evil.example", "/dashboard/"),
        ("/dashboard/\\evil", "/dashboard/"),
        ("javascript:alert(1)", "/dashboard/"),
        ("/v0/namespaces", "/dashboard/"),
        ("/dashboardx", "/dashboard/"),
        ("/dashboard/login?next=/x", "/dashboard/"),
        ("/dashboard/\r\nSet-Cookie: a=b", "/dashboard/"),
    ],
)
def test_safe_next_only_allows_local_dashboard_paths(target: str | None, expected: str) -> None:
    assert session.safe_next(target) == expected


def _node(identifier: str, nxt: list[str] | None = None, unites: str | None = None) -> NodeTemplate:
    return NodeTemplate.model_validate(
        {
            "node_name": identifier.title(),
            "namespace": "ns",
            "identifier": identifier,
            "inputs": {},
            "next_nodes": nxt or [],
            "unites": {"identifier": unites} if unites else None,
        }
    )


def test_layout_puts_every_edge_left_to_right_and_joins_after_the_branches() -> None:
    nodes = [
        _node("root", ["split"]),
        _node("split", ["a", "b"]),
        _node("a", ["a2"]),
        _node("a2"),
        _node("b"),
        _node("join", unites="split"),
    ]
    edges = layout.template_edges(nodes)
    assert layout.Edge("split", "join", unites=True) in edges
    placed = layout.layout([n.identifier for n in nodes], edges)
    columns = {i: p.column for i, p in placed.nodes.items()}
    assert columns == {"root": 0, "split": 1, "a": 2, "b": 2, "a2": 3, "join": 4}
    for edge in edges:
        assert columns[edge.source] < columns[edge.target]
    corners = {(p.x, p.y) for p in placed.nodes.values()}
    assert len(corners) == len(nodes)  # no two boxes on top of each other
    assert placed.width >= 5 * layout.BOX_WIDTH
    long_edge = next(e for e in placed.edges if e.edge.unites)
    assert " L" in long_edge.path  # skips columns: runs below the boxes


def test_layout_survives_a_cycle() -> None:
    edges = [layout.Edge("a", "b"), layout.Edge("b", "a")]
    placed = layout.layout(["a", "b", "c"], edges)
    assert placed.nodes["c"].column == 0
    assert {placed.nodes["a"].column, placed.nodes["b"].column} == {1}


def test_status_bar_segments_fill_the_bar_in_status_order() -> None:
    found = drawing.segments({"ERRORED": 1, "SUCCESS": 9_998, "QUEUED": 1})
    assert [s.status for s in found] == ["SUCCESS", "QUEUED", "ERRORED"]
    assert sum(s.width for s in found) == drawing.BAR_WIDTH
    assert all(s.width >= 2 for s in found)  # one error among 10,000 stays visible
    assert found[0].x == drawing.BAR_X
    assert drawing.segments({}) == []


@pytest.mark.parametrize(
    ("counts", "tone"),
    [
        ({}, "idle"),
        ({"SUCCESS": 2, "CREATED": 1}, "running"),
        ({"SUCCESS": 2, "ERRORED": 1}, "failed"),
        ({"SUCCESS": 2, "RETRY_CREATED": 1, "PRUNED": 1}, "success"),
    ],
)
def test_box_tone(counts: dict[str, int], tone: str) -> None:
    assert drawing.tone(counts) == tone


def _brief(status: str, **values: int | None) -> StateBrief:
    fields: dict[str, object] = {
        "id": "a" * 24,
        "identifier": "work",
        "node_name": "Work",
        "status": status,
        "error": None,
        "group_id": "a" * 24,
        "retry_count": 0,
        "enqueue_after": 0,
        "claimed_at": None,
        "lease_expires_at": None,
        "created_at": 0,
        "updated_at": 0,
    }
    fields.update(values)
    return StateBrief(**fields)  # type: ignore[arg-type]


def test_why_waiting() -> None:
    registered = Registration("worker-1", 1_000)
    delayed = _brief("CREATED", enqueue_after=90_000, retry_count=2)
    assert "retry back-off" in (explain.why_waiting(delayed, "ns", registered, 30_000) or "")
    assert "in 1 min" in (explain.why_waiting(delayed, "ns", registered, 30_000) or "")
    ready = _brief("CREATED", created_at=10_000, enqueue_after=10_000)
    text = explain.why_waiting(ready, "ns", registered, 52_000) or ""
    assert "Ready for 42 s" in text and "worker-1" in text
    unregistered = explain.why_waiting(ready, "ns", None, 52_000) or ""
    assert "no runtime has registered node Work in namespace ns" in unregistered
    held = _brief("QUEUED", claimed_at=1_000, lease_expires_at=61_000)
    assert "lease ends" in (explain.why_waiting(held, "ns", registered, 31_000) or "")
    assert "ended 4 s ago" in (explain.why_waiting(held, "ns", registered, 65_000) or "")
    assert explain.why_waiting(_brief("SUCCESS"), "ns", registered, 0) is None
    assert explain.why_waiting(_brief("ERRORED"), "ns", registered, 0) is None


def test_join_waiting() -> None:
    group = FaninGroup(group_id="g", identifier="split", pending=2, failed=1, descendants=5_000)
    text = explain.join_waiting(group, UnitesStrategy.ALL_SUCCESS)
    assert text == (
        "Waiting for a join: 4,998 of 5,000 states below split have finished, "
        "2 still open (1 failed)."
    )
    stuck = FaninGroup(group_id="g", identifier="split", pending=0, failed=1, descendants=3)
    assert explain.join_waiting(stuck, UnitesStrategy.ALL_SUCCESS).startswith("Will not run")
    assert explain.join_waiting(stuck, UnitesStrategy.ALL_DONE).startswith("Join complete")


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (5, "5 ms"),
        (42_000, "42 s"),
        (185_000, "3 min 5 s"),
        (7_800_000, "2 h 10 min"),
        (3 * 86_400_000 + 3_600_000, "3 d 1 h"),
        (-5, "0 ms"),
    ],
)
def test_duration(ms: int, text: str) -> None:
    assert explain.duration(ms) == text


def test_trigger_form_becomes_the_api_trigger_body() -> None:
    body = trigger_request(
        {
            "csrf_token": "t",
            "store.count": "3",
            "store.title": "",  # blank: the default applies
            "more_store": "a=1\n\nb = x=y\n",
            "input.name": "Ada",
            "input.other": "",
            "start_delay": "250",
        }
    )
    assert body.store == {"count": "3", "a": "1", "b": " x=y"}
    assert body.inputs == {"name": "Ada"}
    assert body.start_delay == 250
    with pytest.raises(InvalidRequest, match="key=value"):
        trigger_request({"more_store": "no equals sign"})
    with pytest.raises(InvalidRequest, match="start_delay"):
        trigger_request({"start_delay": "-1"})
    with pytest.raises(InvalidRequest, match=r"start_delay: .*integer"):
        trigger_request({"start_delay": "1.5"})
