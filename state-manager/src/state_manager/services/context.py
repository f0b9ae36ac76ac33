"""What every service call needs: the database, settings, secret box, wake-ups, caches."""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property

from state_manager.crypto import SecretBox
from state_manager.domain import graph as graph_rules
from state_manager.domain import templating, timeouts
from state_manager.domain.models import GraphSpec, NodeTemplate
from state_manager.errors import NotFound
from state_manager.metrics import Metrics
from state_manager.services.committer import Committer
from state_manager.settings import Settings
from state_manager.store.contract import Store, Transaction, VersionRow
from state_manager.store.failures import SQL_TRANSIENT_ATTEMPTS, is_transient, transient_attempts

TRANSIENT_ATTEMPTS = SQL_TRANSIENT_ATTEMPTS


def retry_transient[**P, T](function: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Run a one-transaction service again when the database aborted it for a transient
    reason (deadlock, serialisation failure, SQLite busy, MongoDB write conflict). Safe:
    the aborted attempt left nothing behind."""

    @functools.wraps(function)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await function(*args, **kwargs)
            except Exception as exc:
                if not is_transient(exc) or attempt >= transient_attempts(exc):
                    raise
                await asyncio.sleep(random.uniform(0, 0.01 * 2 ** min(attempt, 6)))

    return wrapper


def now_ms() -> int:
    return int(time.time() * 1000)


def iso(ms: int) -> str:
    """ISO-8601 UTC text for a millisecond timestamp."""
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class WorkNotifier:
    """Wakes long-polling claimers of a namespace when work may have become claimable."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    def waiter(self, namespace: str) -> asyncio.Future[None]:
        """Register interest *before* looking for work, so no notification is missed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(namespace, set()).add(future)
        return future

    def discard(self, namespace: str, future: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(namespace)
        if waiters is not None:
            waiters.discard(future)
            if not waiters:
                del self._waiters[namespace]
        if not future.done():
            future.cancel()

    def notify(self, namespace: str) -> None:
        for future in self._waiters.pop(namespace, set()):
            if not future.done():
                future.set_result(None)


@dataclass(frozen=True)
class CompiledGraph:
    """An immutable validated graph version with everything precomputed for dispatch."""

    version: VersionRow
    spec: GraphSpec

    @cached_property
    def nodes(self) -> dict[str, NodeTemplate]:
        return {node.identifier: node for node in self.spec.nodes}

    @cached_property
    def root(self) -> NodeTemplate:
        return graph_rules.find_root(self.spec)

    @cached_property
    def uniting_by_target(self) -> dict[str, list[NodeTemplate]]:
        return graph_rules.unites_targets(self.spec)

    @cached_property
    def parsed_inputs(self) -> dict[str, dict[str, templating.ParsedTemplate]]:
        """Per identifier, the parsed template of each input the node receives."""
        parsed: dict[str, dict[str, templating.ParsedTemplate]] = {}
        for node in self.spec.nodes:
            # The fields its registered Inputs schema declared when the graph was validated.
            wanted = self.version.input_fields.get(node.identifier, list(node.inputs))
            parsed[node.identifier] = {
                name: templating.parse(str(node.inputs[name]))
                for name in wanted
                if name in node.inputs
            }
        return parsed

    @cached_property
    def _edge_successors(self) -> dict[str, list[NodeTemplate]]:
        return {
            node.identifier: [
                successor
                for successor in map(self.node, node.successors())
                if successor.unites is None
            ]
            for node in self.spec.nodes
        }

    def edge_successors(self, identifier: str) -> list[NodeTemplate]:
        """The successors an executed state of ``identifier`` creates; a uniting
        successor is left out: its fan-in group creates it once the group completes."""
        self.node(identifier)  # NotFound for an identifier not in this version
        return self._edge_successors[identifier]

    def timeout_ms(self, identifier: str) -> int | None:
        """The timeout (ms) of new states of ``identifier``: the node's, else the graph's."""
        return timeouts.timeout_ms(self.node(identifier).timeout, self.spec.timeout)

    def node(self, identifier: str) -> NodeTemplate:
        try:
            return self.nodes[identifier]
        except KeyError:
            raise NotFound(f"Node {identifier} is not part of graph version") from None


class GraphCache:
    """Compiled graph versions by id (versions never change, so entries never go stale)."""

    def __init__(self, capacity: int = 256) -> None:
        self._entries: OrderedDict[str, CompiledGraph] = OrderedDict()
        self._run_versions: OrderedDict[str, str] = OrderedDict()
        self._capacity = capacity

    async def for_version(self, tx: Transaction, version_id: str) -> CompiledGraph:
        graph = self._entries.get(version_id)
        if graph is None:
            row = await tx.get_version(version_id)
            if row is None:
                raise NotFound(f"Graph version {version_id} not found")
            graph = CompiledGraph(version=row, spec=GraphSpec.model_validate(row.spec))
            self._entries[version_id] = graph
            if len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
        return graph

    async def for_runs(self, tx: Transaction, run_ids: Iterable[str]) -> dict[str, CompiledGraph]:
        """The graph of each run, looking up the runs not seen before in one query."""
        wanted = set(run_ids)
        # Not ``wanted - self._run_versions.keys()``: that walks every remembered run.
        known = self._run_versions
        missing = {run_id for run_id in wanted if run_id not in known}
        if missing:
            found = await tx.run_versions(missing)
            for run_id in missing:
                if run_id not in found:
                    raise NotFound(f"Run {run_id} not found")
            self.remember_runs(found)
        return {run_id: await self.for_version(tx, self._run_versions[run_id]) for run_id in wanted}

    def remember_runs(self, versions: Mapping[str, str]) -> None:
        """Record the version new runs are pinned to (it never changes)."""
        self._run_versions.update(versions)
        while len(self._run_versions) > self._capacity * 64:
            self._run_versions.popitem(last=False)


@dataclass
class Context:
    """The dependencies of the service layer, built once per process."""

    db: Store
    settings: Settings
    box: SecretBox
    metrics: Metrics
    notifier: WorkNotifier = field(default_factory=WorkNotifier)
    graphs: GraphCache = field(default_factory=GraphCache)
    clock: Callable[[], int] = now_ms
    validation_wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    # Every change to states and runs goes through it (started by the app).
    committer: Committer = field(default_factory=Committer)
