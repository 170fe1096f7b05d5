"""Request counters and latency histograms in Prometheus' text format, kept in memory."""

from __future__ import annotations

from collections import Counter, defaultdict

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Counts by (route, method, status) and by token label, latency per route; updated from the event loop only."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.buckets: defaultdict[str, list[int]] = defaultdict(lambda: [0] * len(BUCKETS))
        self.latency_sum: defaultdict[str, float] = defaultdict(float)
        self.latency_count: Counter[str] = Counter()
        self.by_token: Counter[tuple[str, int]] = Counter()
        self.ciphertexts = 0

    def observe(self, route: str, method: str, status: int, seconds: float, token: str | None = None) -> None:
        """Record one finished request (and, for an authenticated one, under its token's label)."""
        self.requests[route, method, status] += 1
        if token is not None:
            self.by_token[token, status] += 1
        counts = self.buckets[route]
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                counts[i] += 1
        self.latency_sum[route] += seconds
        self.latency_count[route] += 1

    def render(self, workers_alive: int) -> str:
        """The exposition text served at /metrics."""
        lines = [
            "# HELP fedfhe_requests_total HTTP requests by route, method and status.",
            "# TYPE fedfhe_requests_total counter",
        ]
        for (route, method, status), n in sorted(self.requests.items()):
            lines.append(f'fedfhe_requests_total{{route="{route}",method="{method}",status="{status}"}} {n}')
        lines += [
            "# HELP fedfhe_request_errors_total HTTP requests answered with a 4xx or 5xx status, by route.",
            "# TYPE fedfhe_request_errors_total counter",
        ]
        errors: Counter[str] = Counter()
        for (route, _, status), n in self.requests.items():
            if status >= 400:
                errors[route] += n
        for route, n in sorted(errors.items()):
            lines.append(f'fedfhe_request_errors_total{{route="{route}"}} {n}')
        lines += [
            "# HELP fedfhe_request_seconds Request latency by route.",
            "# TYPE fedfhe_request_seconds histogram",
        ]
        for route, counts in sorted(self.buckets.items()):
            for bound, n in zip(BUCKETS, counts):
                lines.append(f'fedfhe_request_seconds_bucket{{route="{route}",le="{bound}"}} {n}')
            lines.append(f'fedfhe_request_seconds_bucket{{route="{route}",le="+Inf"}} {self.latency_count[route]}')
            lines.append(f'fedfhe_request_seconds_sum{{route="{route}"}} {self.latency_sum[route]:.6f}')
            lines.append(f'fedfhe_request_seconds_count{{route="{route}"}} {self.latency_count[route]}')
        lines += [
            "# HELP fedfhe_ciphertexts_total Ciphertexts evaluated successfully.",
            "# TYPE fedfhe_ciphertexts_total counter",
            f"fedfhe_ciphertexts_total {self.ciphertexts}",
            "# HELP fedfhe_token_requests_total Authenticated requests by token label and status (429: rate limited).",
            "# TYPE fedfhe_token_requests_total counter",
            *(
                f'fedfhe_token_requests_total{{token="{token}",status="{status}"}} {n}'
                for (token, status), n in sorted(self.by_token.items())
            ),
            "# HELP fedfhe_workers_alive FHE worker processes running now.",
            "# TYPE fedfhe_workers_alive gauge",
            f"fedfhe_workers_alive {workers_alive}",
        ]
        return "\n".join(lines) + "\n"
