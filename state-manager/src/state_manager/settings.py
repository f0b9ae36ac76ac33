"""Settings, built once from the environment and passed in explicitly.

Nothing here is read at import time; :func:`Settings.from_env` is called by the
CLI (or by a test with its own mapping) and the result is handed to ``create_app``.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path


class Mode(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class ConfigError(ValueError):
    """The configuration cannot be used; the message says what to change."""


DEFAULT_CORS_ORIGINS = (
    "http://localhost:3000",
    "http://localhost:3001",
    "http://127.0.0.1:3000",
    "http://127.0.0.1:3001",
)
DEV_SECRETS_FILE = "dev-secrets.env"


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def decode_encryption_key(text: str) -> bytes:
    """Decode ``SECRETS_ENCRYPTION_KEY`` (URL-safe base64 of exactly 32 bytes)."""
    try:
        key = base64.urlsafe_b64decode(text.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ConfigError("SECRETS_ENCRYPTION_KEY is not valid URL-safe base64") from None
    if len(key) != 32:
        raise ConfigError(
            f"SECRETS_ENCRYPTION_KEY must decode to 32 bytes, got {len(key)}; "
            "generate one with `state-manager gen-key`"
        )
    return key


def generate_encryption_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii")


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to run. Immutable once built."""

    mode: Mode = Mode.DEVELOPMENT
    database_url: str = ""
    mongo_uri: str = ""
    mongo_database_name: str = "exosphere-state-manager"
    state_manager_secret: str = ""
    secrets_encryption_key: str = ""
    data_dir: Path = field(default_factory=lambda: Path(".exosphere"))
    log_level: str = "INFO"
    log_format: str = "auto"  # "json", "text", or "auto" (json in production)
    cors_origins: tuple[str, ...] = DEFAULT_CORS_ORIGINS
    trigger_workers: int = 1
    trigger_retention_hours: int = 720
    lease_seconds: int = 3600
    lease_check_ms: int = 5000  # how often the lease-expiry loop looks for expired leases
    max_request_bytes: int = 10 * 1024 * 1024
    max_fanout: int = 10_000
    max_batch_size: int = 1_000
    max_page_size: int = 1_000
    max_wait_ms: int = 30_000
    auto_migrate: bool = True
    dashboard_session_hours: int = 12
    idempotency_ttl_seconds: int = 24 * 3600
    retention_days: int = 0  # 0: finished runs are kept forever
    retention_interval_seconds: int = 60
    retention_batch_runs: int = 500

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, mode: Mode | None = None
    ) -> Settings:
        """Read settings from ``env`` (default: ``os.environ``) and validate them."""
        env = os.environ if env is None else env
        resolved_mode = mode or Mode(env.get("MODE", Mode.PRODUCTION.value).strip().lower())
        origins = tuple(o.strip() for o in env.get("CORS_ORIGINS", "").split(",") if o.strip())
        auto_migrate_raw = env.get("EXOSPHERE_AUTO_MIGRATE", "").strip().lower()
        settings = cls(
            mode=resolved_mode,
            database_url=env.get("DATABASE_URL", "").strip(),
            mongo_uri=env.get("MONGO_URI", "").strip(),
            mongo_database_name=env.get("MONGO_DATABASE_NAME", "").strip()
            or "exosphere-state-manager",
            state_manager_secret=env.get("STATE_MANAGER_SECRET", ""),
            secrets_encryption_key=env.get("SECRETS_ENCRYPTION_KEY", "").strip(),
            data_dir=Path(env.get("EXOSPHERE_DATA_DIR", "").strip() or ".exosphere"),
            log_level=(env.get("LOG_LEVEL", "").strip() or "INFO").upper(),
            log_format=(env.get("LOG_FORMAT", "").strip() or "auto").lower(),
            cors_origins=origins or DEFAULT_CORS_ORIGINS,
            trigger_workers=_int(env, "TRIGGER_WORKERS", 1, 1),
            trigger_retention_hours=_int(env, "TRIGGER_RETENTION_HOURS", 720, 1),
            lease_seconds=_int(env, "STATE_LEASE_SECONDS", 3600, 1),
            lease_check_ms=_int(env, "LEASE_CHECK_MS", 5000, 10),
            max_request_bytes=_int(env, "MAX_REQUEST_BYTES", 10 * 1024 * 1024, 1024),
            max_fanout=_int(env, "MAX_FANOUT", 10_000, 1),
            max_batch_size=_int(env, "MAX_BATCH_SIZE", 1_000, 1),
            max_page_size=_int(env, "MAX_PAGE_SIZE", 1_000, 1),
            max_wait_ms=_int(env, "MAX_WAIT_MS", 30_000, 0),
            dashboard_session_hours=_int(env, "DASHBOARD_SESSION_HOURS", 12, 1),
            idempotency_ttl_seconds=_int(env, "EXOSPHERE_IDEMPOTENCY_TTL_SECONDS", 24 * 3600, 1),
            retention_days=_int(env, "EXOSPHERE_RETENTION_DAYS", 0, 0),
            retention_interval_seconds=_int(env, "EXOSPHERE_RETENTION_INTERVAL_SECONDS", 60, 1),
            retention_batch_runs=_int(env, "EXOSPHERE_RETENTION_BATCH_RUNS", 500, 1),
            auto_migrate=(
                auto_migrate_raw in {"1", "true", "yes"}
                if auto_migrate_raw
                else resolved_mode is Mode.DEVELOPMENT
            ),
        )
        return settings.completed()

    def completed(self) -> Settings:
        """Fill development defaults and check what production requires."""
        settings = self
        if settings.mode is Mode.DEVELOPMENT and (
            not settings.state_manager_secret or not settings.secrets_encryption_key
        ):
            settings = settings._with_dev_secrets()
        missing = [
            name
            for name, value in (
                ("STATE_MANAGER_SECRET", settings.state_manager_secret),
                ("SECRETS_ENCRYPTION_KEY", settings.secrets_encryption_key),
            )
            if not value
        ]
        if missing:
            raise ConfigError(
                "Missing required environment variable(s): "
                + ", ".join(missing)
                + " (production mode never invents secrets; use --mode=development to try it out)"
            )
        decode_encryption_key(settings.secrets_encryption_key)
        if settings.log_format not in {"auto", "json", "text"}:
            raise ConfigError("LOG_FORMAT must be one of auto, json, text")
        if settings.log_level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ConfigError("LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        if settings.mongo_uri:
            raise ConfigError(
                "MONGO_URI is set, but the MongoDB backend is not available in this version; "
                "unset MONGO_URI and use DATABASE_URL (sqlite:///path or postgresql://...)"
            )
        if settings.database_url and not settings.database_url.startswith(
            ("sqlite://", "postgresql://", "postgres://", "postgresql+asyncpg://")
        ):
            raise ConfigError(
                "DATABASE_URL must start with sqlite:/// or postgresql:// "
                f"(got scheme {settings.database_url.split(':', 1)[0]!r})"
            )
        return settings

    def _with_dev_secrets(self) -> Settings:
        """Generate the two secrets once and keep them in ``data_dir``."""
        path = self.data_dir / DEV_SECRETS_FILE
        stored: dict[str, str] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                name, sep, value = line.partition("=")
                if sep:
                    stored[name.strip()] = value.strip()
        changed = False
        if "STATE_MANAGER_SECRET" not in stored:
            stored["STATE_MANAGER_SECRET"] = secrets.token_urlsafe(24)
            changed = True
        if "SECRETS_ENCRYPTION_KEY" not in stored:
            stored["SECRETS_ENCRYPTION_KEY"] = generate_encryption_key()
            changed = True
        if changed:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            text = "".join(f"{k}={v}\n" for k, v in stored.items())
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
        return replace(
            self,
            state_manager_secret=self.state_manager_secret or stored["STATE_MANAGER_SECRET"],
            secrets_encryption_key=self.secrets_encryption_key or stored["SECRETS_ENCRYPTION_KEY"],
        )

    @property
    def dev_secrets_path(self) -> Path:
        return self.data_dir / DEV_SECRETS_FILE

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to an embedded SQLite file in ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'exosphere.db'}"

    @property
    def json_logs(self) -> bool:
        if self.log_format == "auto":
            return self.mode is Mode.PRODUCTION
        return self.log_format == "json"
