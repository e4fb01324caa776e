"""Sentences that say where the latency-throughput curve bends and why; plain Python, read from ``infer.json``."""

from __future__ import annotations

import statistics
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
    """The batch size of most throughput whose single-stream p99 latency meets the budget."""
    within = [p for p in batches if p["latency_s"] and p["latency_s"]["p99"] <= budget_s]
    return max(within, key=lambda p: p["samples_per_s"]) if within else None


def _curve(batches: list[dict[str, Any]], budget_ms: float) -> str:
    """Batch 1's latency and bound, where throughput stops growing, and the best batch size within the budget."""
    smallest, largest = batches[0], batches[-1]
    latency = smallest["latency_s"]
    head = (f"batch {smallest['batch_size']}: {_ms(latency['p90'])} p90" if latency
            else f"batch {smallest['batch_size']}: {_rate(smallest['samples_per_s'])} samples/s offline")
    parts = [", ".join(filter(None, [head, _bound(smallest)]))]
    if len(batches) > 1:
        knee = plateau(batches)
        at = knee or largest
        verb = "stops growing past" if knee else "still grows at"
        parts.append(", ".join(filter(None, [f"throughput {verb} batch {at['batch_size']}: "
                                             f"{_rate(at['samples_per_s'])} samples/s", _bound(at)])))
        best = max(batches, key=lambda p: p["samples_per_s"])
        if knee is not None and best is not knee:
            parts.append(f"the most is {_rate(best['samples_per_s'])} samples/s at batch {best['batch_size']}"
                         + (f" with {_ms(best['latency_s']['p99'])} p99" if best["latency_s"] else ""))
    if latency:
        budget = f"{budget_ms:g} ms p99"
        best = best_within(batches, budget_ms / 1e3)
        parts.append(f"best within {budget}: batch {best['batch_size']} at {_rate(best['samples_per_s'])} samples/s"
                     if best else f"no batch size meets {budget}, batch {smallest['batch_size']} sees "
                                  f"{_ms(latency['p99'])}")
    return "; ".join(parts)


def _server(server: dict[str, Any], budget: str) -> str:
    setup = (f"server, simulated on service times measured in the serving loop (Poisson arrivals, batches of up to "
             f"{server['max_batch']}, {server['timeout_ms']:g} ms time-out, rates {100 * server['step']:.3g}% apart "
             f"around the capacity of {_rate(server['capacity_qps'])} queries/s, at least {server['queries']} queries "
             f"and 100 budgets of arrivals per rate)")
    if server["rate_qps"] is None:
        return f"{setup}: no query rate meets {budget}; even a trickle sees {_ms(server['next_p99_s'])} p99"
    return (f"{setup}: {_rate(server['rate_qps'])} queries/s within {budget} "
            f"({server['capacity_share']:.2f} of capacity, p99 {_ms(server['p99_s'])}, "
            f"mean batch {server['mean_batch']:.1f}); "
            f"{_rate(server['next_rate_qps'])} queries/s misses it (p99 {_ms(server['next_p99_s'])})")


def searched_medians(record: dict[str, Any]) -> dict[str, float]:
    """Replica 0's service time per batch size in the serving loop, at the median: what the search drew from."""
    return {str(p["batch_size"]): float(statistics.median(p["server_service_s"]))
            for p in record["per_replica"][0]["batches"] if p.get("server_service_s")}


def _service_drift(trial: dict[str, Any], searched: dict[str, float]) -> str:
    """The batch size the live server ran most, its median service time live against the searched one."""
    live = trial.get("service_s") or {}
    common = [size for size in live if size in searched]
    if not common:
        return ""
    size = max(common, key=lambda b: live[b]["batches"])
    return (f"batches of {size} took {_ms(live[size]['p50'])} live at the median against "
            f"{_ms(searched[size])} searched")


def _replay(replay: dict[str, Any], budget: str, budget_s: float, searched: dict[str, float]) -> str:
    answer, above = replay["answer"], replay["next"]

    def served(trial: dict[str, Any], verb: str) -> str:
        return (f"{_rate(trial['rate_qps'])} queries/s {verb} {budget} (p99 {_ms(trial['p99_s'])} over "
                f"{trial['queries']:,} queries, mean batch {trial['mean_batch']:.1f})")

    line = (f"served live: {served(answer, 'meets' if answer['budget_met'] else 'misses')}, "
            f"{served(above, 'meets' if above['budget_met'] else 'misses')}; ")
    if replay["agrees"]:
        line += "the replay agrees with the search"
    elif not answer["budget_met"]:
        line += (f"the replay disagrees with the search: the live server is slower than the simulated queue "
                 f"at {_rate(answer['rate_qps'])} queries/s")
    else:
        line += (f"the replay disagrees with the search: the live server still meets the budget at "
                 f"{_rate(above['rate_qps'])} queries/s")
    drift = _service_drift(answer if not answer["budget_met"] else above, searched)
    if not replay["agrees"] and drift:
        line += f" ({drift})"
    lag = max(answer["issue_lag_p99_s"], above["issue_lag_p99_s"])
    if lag > 0.1 * budget_s:
        line += f"; queries were issued up to {_ms(lag)} late at p99, counted against the server"
    return line


def findings(record: dict[str, Any]) -> list[str]:
    batches = sorted(record["batches"], key=lambda p: p["batch_size"])
    budget_s = record["latency_budget_ms"] / 1e3
    budget = f"{record['latency_budget_ms']:g} ms p99"
    lines = [_curve(batches, record["latency_budget_ms"])]
    server = record.get("server")
    if server:
        lines.append(_server(server, budget))
        if server.get("replay"):
            lines.append(_replay(server["replay"], budget, budget_s, searched_medians(record)))
    if record.get("replicas", 1) > 1:
        one = record["per_replica"][0]["batches"]
        by_size = {p["batch_size"]: p for p in one}
        ratios = [(p["samples_per_s"] / by_size[p["batch_size"]]["samples_per_s"], p["batch_size"])
                  for p in batches if by_size.get(p["batch_size"])]
        low, high = min(ratios), max(ratios)
        lines.append(f"{record['replicas']} replicas serve {low[0]:.2f}x (batch {low[1]}) to {high[0]:.2f}x "
                     f"(batch {high[1]}) the samples/s of one of them")
    return lines
