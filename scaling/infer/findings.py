"""Sentences that say where the latency-throughput curve bends and why; plain Python, read from ``infer.json``."""

from __future__ import annotations

from typing import Any

PLATEAU = 0.9
"""Throughput has stopped growing at the first batch size reaching 90% of the sweep's best."""


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _bound(point: dict[str, Any]) -> str:
    kind = point.get("compute_bound")
    if kind is None:
        return ""
    share = point.get("memory_frac") if kind == "memory" else point.get("arithmetic_frac")
    return f"{kind}-bound ({100 * share:.0f}% of operator time)" if share is not None else f"{kind}-bound"


def plateau(batches: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The smallest batch size whose throughput reaches PLATEAU of the best, when larger ones were measured."""
    ordered = sorted(batches, key=lambda p: p["batch_size"])
    best = max(p["samples_per_s"] for p in ordered)
    first = next(p for p in ordered if p["samples_per_s"] >= PLATEAU * best)
    return first if first is not ordered[-1] else None


def best_within(batches: list[dict[str, Any]], budget_s: float) -> dict[str, Any] | None:
    """The batch size of most throughput whose p99 latency meets the budget."""
    within = [p for p in batches if p["latency_s"]["p99"] <= budget_s]
    return max(within, key=lambda p: p["samples_per_s"]) if within else None


def findings(record: dict[str, Any]) -> list[str]:
    batches = sorted(record["batches"], key=lambda p: p["batch_size"])
    budget_s = record["latency_budget_ms"] / 1e3
    smallest, largest = batches[0], batches[-1]
    head = f"batch {smallest['batch_size']}: {_ms(smallest['latency_s']['p90'])} p90"
    bound = _bound(smallest)
    parts = [f"{head}, {bound}" if bound else head]
    if len(batches) > 1:
        knee = plateau(batches)
        if knee is None:
            parts.append(f"throughput still grows at batch {largest['batch_size']} "
                         f"({_rate(largest['samples_per_s'])} samples/s"
                         + (f", {_bound(largest)})" if _bound(largest) else ")"))
        else:
            best = max(batches, key=lambda p: p["samples_per_s"])
            parts.append(f"throughput stops growing past batch {knee['batch_size']} "
                         f"({_bound(knee) + ', ' if _bound(knee) else ''}{_rate(knee['samples_per_s'])} samples/s; "
                         f"best {_rate(best['samples_per_s'])} at batch {best['batch_size']}, "
                         f"p99 {_ms(best['latency_s']['p99'])})")
    best = best_within(batches, budget_s)
    budget = f"{record['latency_budget_ms']:g} ms p99"
    parts.append(f"best within {budget}: batch {best['batch_size']} at {_rate(best['samples_per_s'])} samples/s"
                 if best else f"no batch size meets {budget} (batch {smallest['batch_size']}: "
                              f"{_ms(smallest['latency_s']['p99'])})")
    lines = ["; ".join(parts)]
    server = record.get("server")
    if server:
        setup = (f"server (Poisson arrivals, dynamic batches of up to {server['max_batch']}, "
                 f"{server['timeout_ms']:g} ms time-out, at least {server['queries']} queries and 100 budgets of arrivals per rate)")
        if server["rate_qps"] is None:
            lines.append(f"{setup}: no query rate meets {budget}; even a trickle sees "
                         f"{_ms(server['next_p99_s'])} p99")
        else:
            lines.append(f"{setup}: {_rate(server['rate_qps'])} queries/s within {budget} "
                         f"(p99 {_ms(server['p99_s'])}, mean batch {server['mean_batch']:.1f}); "
                         f"{_rate(server['next_rate_qps'])} queries/s misses it (p99 {_ms(server['next_p99_s'])})")
    if record.get("replicas", 1) > 1:
        one = record["per_replica"][0]["batches"]
        by_size = {p["batch_size"]: p for p in one}
        ratios = [(p["samples_per_s"] / by_size[p["batch_size"]]["samples_per_s"], p["batch_size"])
                  for p in batches if by_size.get(p["batch_size"])]
        low, high = min(ratios), max(ratios)
        lines.append(f"{record['replicas']} replicas serve {low[0]:.2f}x (batch {low[1]}) to {high[0]:.2f}x "
                     f"(batch {high[1]}) the samples/s of one of them")
    return lines
