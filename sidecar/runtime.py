"""What every exchange shares: the current config, worker pools, ledger and metrics.

A reload swaps in a new `Generation` (config + pools) as a whole; an exchange
holds the generation it started with, so a reload never changes a request in
flight. The ledger and metrics live across generations.
"""

from __future__ import annotations

import gc
import logging
import resource
import time
from dataclasses import dataclass, field

from sidecar.config import Config, UpstreamConfig
from sidecar.ledger import Ledger
from sidecar.metrics import Metrics
from sidecar.upstream import UpstreamPool


@dataclass(slots=True)
class Generation:
    """One loaded config and the worker pools built for it."""

    config: Config
    pools: dict[UpstreamConfig, UpstreamPool] = field(default_factory=dict)

    def pool_for(self, upstream: UpstreamConfig) -> UpstreamPool:
        pool = self.pools.get(upstream)
        if pool is None:
            pool = self.pools[upstream] = UpstreamPool(upstream, self.config.limits.max_header_bytes)
        return pool

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


log = logging.getLogger("sidecar.runtime")

#: File descriptors kept back for listeners, the ledger, logs and the admin port.
FD_RESERVE = 64


def connection_cap() -> int:
    """How many client connections the fd limit allows (each may hold a worker connection too).

    Raises the soft RLIMIT_NOFILE to the hard limit first, as daemons do, so that
    `max_connections` rather than the fd table sheds load: a client refused with 503
    is better than one left unaccepted in the backlog while accept() fails with EMFILE.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return max((soft - FD_RESERVE) // 2, 1)


def tune_gc() -> None:
    """Collect and freeze what start-up built, and collect young objects less often.

    The hot path allocates short-lived dicts (one per parsed event) that reference
    counting frees at once; the cyclic collector only needs to look at what survives, and
    never again at modules, config and code objects from start-up.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


class Runtime:
    """The daemon's shared state, as seen by connections and exchanges."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics(config.pricing.currency)
        self.ledger = Ledger(config.usage_log, self.metrics)
        self.current = Generation(config)
        self.connections = 0
        self.draining = False
        self.fd_cap = connection_cap()
        self._last_shed_log = 0.0
        if self.fd_cap < config.limits.max_connections:
            log.warning(
                "the file descriptor limit allows %d client connections, below max_connections %d",
                self.fd_cap,
                config.limits.max_connections,
            )

    @property
    def max_connections(self) -> int:
        """The effective connection limit: max_connections, capped by the fd limit."""
        return min(self.config.limits.max_connections, self.fd_cap)

    def shedding(self) -> None:
        """Note a refused connection; logged at most every 10 s."""
        now = time.monotonic()
        if now - self._last_shed_log >= 10.0:
            self._last_shed_log = now
            log.warning(
                "at the connection limit (%d open): refusing new clients with 503", self.connections
            )

    @property
    def config(self) -> Config:
        return self.current.config

    def reload(self, config: Config) -> None:
        """Swap in a new config; pools of the old generation close as their connections idle."""
        old = self.current
        self.current = Generation(config)
        old.close()
        self.metrics.currency = config.pricing.currency
        if config.usage_log != old.config.usage_log:
            self.ledger.close()
            self.ledger = Ledger(config.usage_log, self.metrics)
        else:
            self.ledger.reopen()
