"""Prometheus metrics, in a registry of their own (injectable, so tests do not share state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Every metric lorawarm exports; one instance per daemon."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.adapters = Gauge("lorawarm_adapters", "Adapters by state.", ["state"], registry=r)
        self.server_up = Gauge(
            "lorawarm_server_up",
            "1 when the vLLM server answers and accepts our calls.",
            ["server"],
            registry=r,
        )
        self.loads = Counter(
            "lorawarm_loads", "Adapters loaded into a vLLM server.", ["server"], registry=r
        )
        self.unloads = Counter(
            "lorawarm_unloads", "Adapters unloaded from a vLLM server.", ["server"], registry=r
        )
        self.failures = Counter(
            "lorawarm_failures",
            "Failed calls to a vLLM server, by condition.",
            ["server", "condition"],
            registry=r,
        )
        self.drop_to_ready = Histogram(
            "lorawarm_drop_to_ready_seconds",
            "From a folder appearing or changing to its snapshot being loaded on a server.",
            ["server"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.reconcile_seconds = Histogram(
            "lorawarm_reconcile_seconds",
            "Duration of one reconcile pass on a server.",
            ["server"],
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.collection_held = Gauge(
            "lorawarm_collection_held",
            "1 while snapshot collection waits for this server (never listed yet).",
            ["server"],
            registry=r,
        )
        self.inspections = Counter(
            "lorawarm_inspections",
            "Adapter folders inspected, by verdict.",
            ["verdict"],
            registry=r,
        )
        self.drop_dir_present = Gauge(
            "lorawarm_drop_dir_present",
            "1 while the drop directory exists, 0 while it cannot be found (nothing is taken).",
            registry=r,
        )
