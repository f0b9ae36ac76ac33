"""Command line: ``state-manager [serve|migrate|gen-key]``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from fastapi import FastAPI

from state_manager import logs
from state_manager.errors import DatabaseNotMigrated, DatabaseNotSupported
from state_manager.settings import ConfigError, Mode, Settings, generate_encryption_key
from state_manager.store import open_store
from state_manager.store.failures import DATABASE_ERRORS, unavailable


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="state-manager",
        description="Exosphere-compatible workflow state manager.",
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=["serve", "migrate", "gen-key"],
        help="serve (default): run the HTTP server; migrate: bring the database schema "
        "up to date; gen-key: print a new SECRETS_ENCRYPTION_KEY",
    )
    parser.add_argument(
        "--mode",
        choices=[m.value for m in Mode],
        default=None,
        help="development: generates missing secrets into the data dir, migrates on start, "
        "binds 127.0.0.1; production (default, or $MODE): requires secrets, binds 0.0.0.0",
    )
    parser.add_argument("--host", default=None, help="bind address")
    parser.add_argument("--port", type=int, default=None, help="bind port (default 8000)")
    parser.add_argument(
        "--workers", type=int, default=1, help="server processes sharing the port (default 1)"
    )
    return parser


def _settings(mode: str | None) -> Settings:
    return Settings.from_env(mode=Mode(mode) if mode else None)


async def _migrate(settings: Settings, *, apply: bool) -> list[int]:
    db = open_store(settings)
    try:
        applied = await db.migrate() if apply else []
        await db.check_migrated()
        return applied
    finally:
        await db.close()


def app_from_env() -> FastAPI:
    """App factory for server processes: settings come from the environment."""
    from state_manager.app import create_app

    settings = Settings.from_env()
    logs.configure(settings.log_level, json_lines=settings.json_logs)
    return create_app(settings)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "gen-key":
        print(generate_encryption_key())
        return
    try:
        settings = _settings(args.mode)
    except (ConfigError, ValueError) as exc:
        print(f"state-manager: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logs.configure(settings.log_level, json_lines=settings.json_logs)
    try:
        applied = asyncio.run(
            _migrate(settings, apply=args.command == "migrate" or settings.auto_migrate)
        )
    except (DatabaseNotMigrated, DatabaseNotSupported) as exc:
        print(f"state-manager: {exc.detail}", file=sys.stderr)
        raise SystemExit(3) from None
    except DATABASE_ERRORS as exc:
        if not isinstance(exc, OSError) and unavailable(exc) is None:
            raise
        print(f"state-manager: cannot reach the database: {exc}", file=sys.stderr)
        raise SystemExit(3) from None
    if args.command == "migrate":
        print(f"database is up to date (applied: {applied or 'nothing'})")
        return
    if settings.mode is Mode.DEVELOPMENT:
        print(
            f"development mode: API key and encryption key are in {settings.dev_secrets_path}; "
            f"database {settings.database_description}",
            file=sys.stderr,
        )
    # Server processes rebuild settings from the environment: hand them what we resolved.
    os.environ.update(
        {
            "MODE": settings.mode.value,
            "STATE_MANAGER_SECRET": settings.state_manager_secret,
            "SECRETS_ENCRYPTION_KEY": settings.secrets_encryption_key,
            "EXOSPHERE_DATA_DIR": str(settings.data_dir),
        }
    )
    host = args.host or ("127.0.0.1" if settings.mode is Mode.DEVELOPMENT else "0.0.0.0")
    import uvicorn

    uvicorn.run(
        "state_manager.cli:app_from_env",
        factory=True,
        host=host,
        port=args.port or 8000,
        workers=args.workers,
        log_config=None,
        proxy_headers=True,
        timeout_graceful_shutdown=30,
    )
