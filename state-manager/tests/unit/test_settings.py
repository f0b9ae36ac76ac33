from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from state_manager.settings import ConfigError, Mode, Settings, generate_encryption_key

KEY = generate_encryption_key()


def test_development_generates_secrets_once_and_keeps_them(tmp_path: Path) -> None:
    env = {"EXOSPHERE_DATA_DIR": str(tmp_path / "data")}
    first = Settings.from_env(env, mode=Mode.DEVELOPMENT)
    second = Settings.from_env(env, mode=Mode.DEVELOPMENT)
    assert first.state_manager_secret and first.secrets_encryption_key
    assert (first.state_manager_secret, first.secrets_encryption_key) == (
        second.state_manager_secret,
        second.secrets_encryption_key,
    )
    secrets_file = tmp_path / "data" / "dev-secrets.env"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    assert first.resolved_database_url == f"sqlite:///{tmp_path / 'data' / 'exosphere.db'}"
    assert first.auto_migrate and not first.json_logs


def test_development_keeps_secrets_given_in_the_environment(tmp_path: Path) -> None:
    env = {"EXOSPHERE_DATA_DIR": str(tmp_path), "STATE_MANAGER_SECRET": "mine"}
    settings = Settings.from_env(env, mode=Mode.DEVELOPMENT)
    assert settings.state_manager_secret == "mine"


def test_production_names_every_missing_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"EXOSPHERE_DATA_DIR": str(tmp_path)}, mode=Mode.PRODUCTION)
    assert "STATE_MANAGER_SECRET" in str(info.value)
    assert "SECRETS_ENCRYPTION_KEY" in str(info.value)
    assert not (tmp_path / "dev-secrets.env").exists()


def production(**env: str) -> Settings:
    return Settings.from_env(
        {"STATE_MANAGER_SECRET": "k", "SECRETS_ENCRYPTION_KEY": KEY, **env}, mode=Mode.PRODUCTION
    )


def test_production_defaults() -> None:
    settings = production()
    assert settings.json_logs and not settings.auto_migrate
    assert (settings.trigger_workers, settings.trigger_retention_hours) == (1, 720)
    assert settings.retention_days == 0  # retention is off unless asked for
    assert settings.idempotency_ttl_seconds == 24 * 3600


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SECRETS_ENCRYPTION_KEY": base64.urlsafe_b64encode(b"short").decode()}, "32 bytes"),
        ({"SECRETS_ENCRYPTION_KEY": "not base64!"}, "base64"),
        ({"MONGO_URI": "mongodb://localhost"}, "MONGO_URI"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"TRIGGER_WORKERS": "zero"}, "TRIGGER_WORKERS"),
        ({"TRIGGER_RETENTION_HOURS": "0"}, "at least 1"),
        ({"DASHBOARD_SESSION_HOURS": "0"}, "DASHBOARD_SESSION_HOURS must be at least 1"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"LEASE_CHECK_MS": "5"}, "LEASE_CHECK_MS must be at least 10"),
        ({"EXOSPHERE_RETENTION_DAYS": "-1"}, "EXOSPHERE_RETENTION_DAYS must be at least 0"),
        ({"EXOSPHERE_IDEMPOTENCY_TTL_SECONDS": "0"}, "EXOSPHERE_IDEMPOTENCY_TTL_SECONDS"),
        ({"EXOSPHERE_RETENTION_BATCH_RUNS": "0"}, "EXOSPHERE_RETENTION_BATCH_RUNS"),
    ],
)
def test_bad_settings_are_refused_with_a_reason(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        production(**env)


def test_numeric_settings_are_read() -> None:
    settings = production(TRIGGER_WORKERS="3", STATE_LEASE_SECONDS="60", LOG_LEVEL="debug")
    assert (settings.trigger_workers, settings.lease_seconds, settings.log_level) == (
        3,
        60,
        "DEBUG",
    )
    assert production().dashboard_session_hours == 12
    assert production(DASHBOARD_SESSION_HOURS="2").dashboard_session_hours == 2
    assert production().lease_check_ms == 5000
    assert production(LEASE_CHECK_MS="100").lease_check_ms == 100
    retention = production(
        EXOSPHERE_RETENTION_DAYS="30",
        EXOSPHERE_IDEMPOTENCY_TTL_SECONDS="60",
        EXOSPHERE_RETENTION_INTERVAL_SECONDS="5",
        EXOSPHERE_RETENTION_BATCH_RUNS="50",
    )
    assert (
        retention.retention_days,
        retention.idempotency_ttl_seconds,
        retention.retention_interval_seconds,
        retention.retention_batch_runs,
    ) == (30, 60, 5, 50)
