"""Prometheus text exposition (format 0.0.4) of the server's counters and histograms, written out by hand: the
server needs three metric kinds, not a client library.

Series: ``mmformer_requests_total{route,status}``, ``mmformer_request_duration_seconds{route}``,
``mmformer_batch_size{route}``, ``mmformer_queue_wait_seconds{route}``.
"""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _labels(labels: dict[str, str]) -> str:
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for k, v in sorted(labels.items()))  # fmt: skip
    return "{" + ",".join(escaped) + "}" if labels else ""


class Histogram:
    """Cumulative buckets, sum and count per label set."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.series: dict[tuple, list[float]] = {}  # labels → [count per bucket..., +Inf count, sum]

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        row = self.series.setdefault(key, [0.0] * (len(self.buckets) + 2))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                row[i] += 1
        row[-2] += 1
        row[-1] += value

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, row in sorted(self.series.items()):
            labels = dict(key)
            for bound, count in zip((*map(_number, self.buckets), "+Inf"), row[:-1]):
                out.append(f"{self.name}_bucket{_labels({**labels, 'le': bound})} {_number(count)}")
            out.append(f"{self.name}_sum{_labels(labels)} {row[-1]!r}")
            out.append(f"{self.name}_count{_labels(labels)} {_number(row[-2])}")
        return out


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Metrics:
    """The server's metrics; every method is thread-safe (the model thread records batches)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0  # requests being answered (changed on the event loop only)
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency = Histogram("mmformer_request_duration_seconds", "Request latency by route.", LATENCY_BUCKETS)
        self.batch = Histogram("mmformer_batch_size", "Inputs per model call by route.", BATCH_BUCKETS)
        self.wait = Histogram("mmformer_queue_wait_seconds", "Time an input waited for its batch.", LATENCY_BUCKETS)

    def request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[route, status] += 1
            self.latency.observe(seconds, route=route)

    def batch_ran(self, route: str, size: int, waits: list[float]) -> None:
        with self._lock:
            self.batch.observe(size, route=route)
            for w in waits:
                self.wait.observe(w, route=route)

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP mmformer_requests_total Requests by route and HTTP status.",
                     "# TYPE mmformer_requests_total counter"]  # fmt: skip
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f"mmformer_requests_total{_labels({'route': route, 'status': str(status)})} {n}")
            lines += ["# HELP mmformer_requests_in_flight Requests being answered.",
                      "# TYPE mmformer_requests_in_flight gauge",
                      f"mmformer_requests_in_flight {self.in_flight}"]  # fmt: skip
            for histogram in (self.latency, self.batch, self.wait):
                lines += histogram.lines()
        return "\n".join(lines) + "\n"
