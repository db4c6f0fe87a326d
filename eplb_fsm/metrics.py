"""Prometheus metrics for `EplbRuntime` (needs the ``metrics`` extra: prometheus-client).

Off by default: nothing in eplb_fsm imports this module, so a server without
prometheus-client never pays for it. Importing it without the package raises
an `ImportError` that names the extra to install::

    from prometheus_client import start_http_server
    from eplb_fsm.metrics import EplbMetrics

    metrics = EplbMetrics(rt)                  # global registry, names eplb_*
    start_http_server(9400 + rank)             # one /metrics per rank

See `eplb_fsm._integrations.metrics` for every metric's name, type and labels.
"""

from ._integrations.metrics import DEFAULT_BUCKETS, EplbMetrics

__all__ = ["DEFAULT_BUCKETS", "EplbMetrics"]
