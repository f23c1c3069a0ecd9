"""What every exchange shares: the current config, worker pools, ledger and metrics.

A reload swaps in a new `Generation` (config + pools) as a whole; an exchange
holds the generation it started with, so a reload never changes a request in
flight. The ledger and metrics live across generations.
"""

from __future__ import annotations

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


class Runtime:
    """The daemon's shared state, as seen by connections and exchanges."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics(config.pricing.currency)
        self.ledger = Ledger(config.usage_log, self.metrics)
        self.current = Generation(config)
        self.connections = 0
        self.draining = False

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
