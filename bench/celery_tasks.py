"""The Celery app of ``compare.py``: the same no-op work as ``ours_worker.py``, as tasks.

Runs only in the benchmark's Celery environment (``celery_env/``). Configured from the
environment: ``BENCH_REDIS_URL`` (broker and result backend, one dedicated database) and
``BENCH_RECORD_DIR`` (each worker process appends its records to a file of its own).

Settings: Celery's defaults except JSON only and no start-up warning: acks on receipt
(``acks_late`` off), prefetch multiplier 4, results in Redis (needed by chords and by the
client waiting for results).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import Celery, chord
from celery.signals import task_postrun
from measure import RecordWriter

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")

app = Celery("bench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_writer: RecordWriter | None = None
_writer_pid = 0


def writer() -> RecordWriter:
    """This process's record file (pool children are forked: one file per pid)."""
    global _writer, _writer_pid
    if _writer is None or _writer_pid != os.getpid():
        directory = Path(os.environ["BENCH_RECORD_DIR"])
        _writer = RecordWriter(directory / f"celery-{os.getpid()}.tsv")
        _writer_pid = os.getpid()
    return _writer


def record(kind: str, key: str, start: float) -> None:
    writer().write(kind, key, start, time.monotonic())


@task_postrun.connect
def _stored(**_kwargs: Any) -> None:
    """Sent after the task's result (and a chord's part) is stored in the backend."""
    now = time.monotonic()
    writer().write("done", "-", now, now)


@app.task
def step(previous: list[Any]) -> list[Any]:
    """One link of a chain: receives ``[tag, k]`` from the previous link."""
    start = time.monotonic()
    tag, k = previous[0], int(previous[1]) + 1
    record("step", f"{tag}:{k}", start)
    return [tag, k]


@app.task
def fan(tag: str, n: int) -> str:
    """Makes ``n`` items and starts one child task per item, joined by a chord callback.
    Returns the id of the callback's result."""
    start = time.monotonic()
    items = [str(i) for i in range(n)]
    record("fan", tag, start)
    result = chord(child.s(tag, item) for item in items)(join.s(tag))
    return str(result.id)


@app.task
def child(tag: str, item: str) -> None:
    record("child", f"{tag}:{item}", time.monotonic())


@app.task
def join(results: list[Any], tag: str) -> int:
    record("join", tag, time.monotonic())
    return len(results)


@app.task
def single(tag: str, i: str) -> None:
    record("single", f"{tag}:{i}", time.monotonic())
