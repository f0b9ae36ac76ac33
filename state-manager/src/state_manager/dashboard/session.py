"""Dashboard sessions: stateless signed cookies, CSRF tokens and safe redirect targets.

A session is ``base64url(JSON payload) + "." + base64url(HMAC-SHA256)``. The payload
holds an expiry and the session's CSRF token; nothing secret. The signing key is
derived from both configured secrets, so every replica with the same configuration
accepts the same cookies, and changing the API key (``STATE_MANAGER_SECRET``) signs
every session out. Pure code: no I/O, the caller passes the clock.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

SESSION_COOKIE = "exo_dashboard_session"
LOGIN_COOKIE = "exo_dashboard_login"
COOKIE_PATH = "/dashboard"
HOME = "/dashboard/"
LOGIN_NONCE_SECONDS = 15 * 60


def signing_key(api_key: str, encryption_key: str) -> bytes:
    """A key for session cookies, derived from (and revealing nothing of) both secrets."""
    material = hashlib.sha256(api_key.encode("utf-8")).digest()
    return hmac.new(
        encryption_key.encode("utf-8"), b"exosphere-dashboard-session-v1" + material, "sha256"
    ).digest()


def api_key_matches(given: str, expected: str) -> bool:
    """Constant-time comparison of an API key typed into the sign-in form."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Session:
    """A signed-in browser: when the session ends (Unix seconds) and its CSRF token."""

    expires_at: int
    csrf_token: str


class Signer:
    """Signs and checks the dashboard's cookies with one key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _seal(self, payload: dict[str, object]) -> str:
        body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode("utf-8"))
        mac = hmac.new(self._key, body.encode("ascii"), "sha256").digest()
        return f"{body}.{_b64(mac)}"

    def _open(self, token: str | None, kind: str, now: int) -> dict[str, object] | None:
        if not token or token.count(".") != 1 or len(token) > 4096:
            return None
        body, mac = token.split(".")
        expected = hmac.new(self._key, body.encode("ascii", "replace"), "sha256").digest()
        try:
            if not hmac.compare_digest(_unb64(mac), expected):
                return None
            payload = json.loads(_unb64(body))
        except (binascii.Error, ValueError):
            return None
        if not isinstance(payload, dict) or payload.get("kind") != kind:
            return None
        expires = payload.get("exp")
        if not isinstance(expires, int) or expires <= now:
            return None
        return payload

    def new_session(self, now: int, lifetime_s: int) -> tuple[Session, str]:
        """A fresh session and its cookie value."""
        session = Session(expires_at=now + lifetime_s, csrf_token=secrets.token_urlsafe(32))
        cookie = self._seal(
            {"kind": "session", "exp": session.expires_at, "csrf": session.csrf_token}
        )
        return session, cookie

    def session(self, cookie: str | None, now: int) -> Session | None:
        """The session a cookie carries, or None if it is missing, forged or expired."""
        payload = self._open(cookie, "session", now)
        if payload is None or not isinstance(payload.get("csrf"), str):
            return None
        return Session(expires_at=int(str(payload["exp"])), csrf_token=str(payload["csrf"]))

    def new_login_nonce(self, now: int) -> tuple[str, str]:
        """A nonce for the sign-in form and the cookie that vouches for it (double submit)."""
        nonce = secrets.token_urlsafe(24)
        return nonce, self._seal({"kind": "login", "exp": now + LOGIN_NONCE_SECONDS, "n": nonce})

    def login_nonce_ok(self, cookie: str | None, nonce: str, now: int) -> bool:
        payload = self._open(cookie, "login", now)
        expected = payload.get("n") if payload is not None else None
        return isinstance(expected, str) and hmac.compare_digest(
            expected.encode("utf-8"), nonce.encode("utf-8")
        )


def csrf_ok(session: Session, submitted: str | None) -> bool:
    """Whether a submitted CSRF token is this session's (constant time)."""
    return submitted is not None and hmac.compare_digest(
        session.csrf_token.encode("utf-8"), submitted.encode("utf-8")
    )


def same_origin(origin: str | None, referer: str | None, own_host: str) -> bool:
    """Whether a state-changing request comes from our own pages.

    The host of ``Origin`` (when the browser sends one; ``null`` never matches), else
    of the ``Referer``, must be the ``Host`` the request was sent to. Hosts, not
    schemes, are compared so that a TLS-terminating proxy in front does not break
    forms. A request with neither header is accepted here: it still needs the CSRF
    token, which only our pages carry.
    """
    source = origin if origin else referer
    if not source:
        return True
    return bool(own_host) and urlsplit(source).netloc == own_host


def safe_next(target: str | None) -> str:
    """A local dashboard path to return to after sign-in; anything else becomes the home page.

    Refuses absolute URLs, scheme-relative ``//host`` forms, backslashes (which some
    browsers read as slashes) and control characters, so the sign-in page is no open
    redirect.
    """
    if not target or len(target) > 2048:
        return HOME
    if any(ch == "\\" or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in target):
        return HOME
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or target.startswith("//"):
        return HOME
    if parts.path != COOKIE_PATH and not parts.path.startswith(COOKIE_PATH + "/"):
        return HOME
    if parts.path.startswith("/dashboard/login") or parts.path.startswith("/dashboard/logout"):
        return HOME
    return target
