"""Step time at another world size, link, bucket size or hook, from measured points.

For a target the model takes the measured point nearest to it (same per-rank batch, nearest
world size), keeps what was measured there and replaces only the gradient communication:

    step = nocomm + interference + sync + wait + exposed

``nocomm`` is the no-communication control step (data, forward, backward, optimizer, overhead:
``controls.nocomm_step_s``), ``interference`` what communication cost beyond its exposed time
(compute slowed by the backend's work: the measured step against the control), ``sync`` the
buffer broadcast, ``wait`` the waiting for slower ranks, all as measured; ``exposed`` comes
from the bucket pipeline (``events.simulate``) with each bucket's measured ready time and an
α/β cost at the target world size. For another per-rank batch (strong scaling), forward and
backward compute come from a measured point or solo control at that batch, else scale with
the batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from scaling.predict.events import HOOK_WIRE_FACTOR, Link, Links, busy_periods, fit_link, rebucket, simulate
from scaling.predict.runs import Point

EXTRAPOLATION_LIMIT = 8
"""Beyond this factor from the measured world sizes a prediction is flagged."""

ASSUMPTIONS = (
    "ring all-reduce per bucket: 2(n-1)·α + 2(n-1)/n·S/B; one process per host link, every rank's traffic on its own link "
    "(with a commbench at several world sizes, each world size's own α and B)",
    "buckets run one after another on the link in DDP's order, each when ready (two at once on gloo share the link: "
    "the last completion is the same)",
    "per-rank compute, data loading, optimizer and framework overhead as measured at the base point: no more or less "
    "contention for cores or memory at other world sizes",
    "interference (communication slowing compute), the buffer broadcast and the waiting for slower ranks carried over "
    "from the base point unchanged",
    "fp16/bf16 hooks halve the wire bytes; the cost of compressing is not modelled; PowerSGD is not modelled",
)


@dataclass(frozen=True)
class Target:
    world_size: int
    link: Link | Links
    """One link for every world size, or fits measured at several (the one at the target's world size)."""
    bucket_cap_mb: float | None = None
    """None: the base point's buckets as measured."""
    hook: str | None = None
    """None: the base point's hook."""
    global_batch: int | None = None
    """Strong scaling: per-rank batch = global_batch // world_size. None: weak scaling."""
    batch_per_rank: int | None = None
    """Weak scaling's per-rank batch; None: the one most measured points with a timeline used."""


@dataclass
class Prediction:
    world_size: int
    batch_per_rank: int
    global_batch: int
    step_s: float
    compute_s: float
    data_s: float
    other_s: float
    comm_s: float
    comm_exposed_s: float
    comm_wait_s: float
    interference_s: float
    nocomm_step_s: float
    samples_per_s: float
    buckets: int
    wire_bytes: int
    bound: str
    base: str
    compute_source: str
    efficiency: float | None = None
    link: str = ""
    """Where the all-reduce cost at this world size comes from."""
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return asdict(self)


def fit_from_points(points: list[Point], alpha_s: float | None = None) -> tuple[float, float] | None:
    """α and B fitted on the measured last-arrival bucket durations of every multi-process point."""
    periods = []
    for p in points:
        if p.world_size > 1 and p.buckets:
            periods += busy_periods(p.world_size, [b.ready_s for b in p.buckets], [b.allreduce_s for b in p.buckets],
                                    [b.wire_bytes for b in p.buckets])
    return fit_link(periods, alpha_s)


def _distance(a: int, b: int) -> float:
    return abs(math.log(a) - math.log(b))


def choose_base(points: list[Point], batch: int, world_size: int, hook: str | None, cap: float | None) -> Point:
    timed = [p for p in points if p.world_size > 1 and p.buckets]
    if not timed:
        raise ValueError("no measured run with a bucket timeline (buckets.json): run at least one multi-process job")
    return min(timed, key=lambda p: (abs(p.batch_per_rank - batch) / batch, _distance(p.world_size, world_size),
                                     hook is not None and p.hook != hook,
                                     cap is not None and p.bucket_cap_mb != cap, -p.world_size))


def compute_scale(points: list[Point], base: Point, batch: int) -> tuple[float, str]:
    """Factor on the base point's forward and backward compute at per-rank ``batch``, and where it comes from."""
    if batch == base.batch_per_rank:
        return 1.0, f"measured at batch {batch} ({base.folder.name})"
    fb_base = base.nocomm_s - base.fixed_s
    same = [p for p in points if p.batch_per_rank == batch]
    multi = sorted((p for p in same if p.world_size > 1), key=lambda p: _distance(p.world_size, base.world_size))
    if multi and fb_base > 0:
        other = multi[0]
        return (other.nocomm_s - other.fixed_s) / fb_base, f"measured at batch {batch} ({other.folder.name})"
    solo = [p for p in same if p.world_size == 1]
    solo_base = [p for p in points if p.world_size == 1 and p.batch_per_rank == base.batch_per_rank]
    if solo and solo_base and fb_base > 0:
        ratio = (solo[0].nocomm_s - solo[0].fixed_s) / (solo_base[0].nocomm_s - solo_base[0].fixed_s)
        return ratio, f"solo controls at batch {batch} and {base.batch_per_rank} ({solo[0].folder.name})"
    if solo and fb_base > 0:
        return (solo[0].nocomm_s - solo[0].fixed_s) / fb_base, f"solo control at batch {batch} ({solo[0].folder.name})"
    return batch / base.batch_per_rank, (f"ASSUMED: forward and backward scale with the batch "
                                         f"({base.batch_per_rank} -> {batch}; no run or control at batch {batch})")


def predict(points: list[Point], target: Target) -> Prediction:
    n = target.world_size
    if target.hook is not None and target.hook not in HOOK_WIRE_FACTOR:
        raise ValueError(f"--hook {target.hook}: the model prices {', '.join(HOOK_WIRE_FACTOR)}")
    timed = [p.batch_per_rank for p in points if p.world_size > 1 and p.buckets]
    if target.global_batch is not None:
        batch = max(1, target.global_batch // n)
    else:
        batch = target.batch_per_rank or (max(set(timed), key=timed.count) if timed else 1)
    base = choose_base(points, batch, n, target.hook, target.bucket_cap_mb)
    scale, source = compute_scale(points, base, batch)
    notes: list[str] = []
    fb = (base.nocomm_s - base.fixed_s) * scale
    nocomm = base.fixed_s + fb
    if n == 1:
        return _finish(Prediction(1, batch, batch, nocomm, nocomm - base.get("data_s") - base.get("other_s"),
                                  base.get("data_s"), base.get("other_s"), 0.0, 0.0, 0.0, 0.0, nocomm,
                                  batch / nocomm, 0, 0, "", base.folder.name, source, notes=notes))
    order = base.buckets  # launch order
    sizes = [b.bytes for b in order]
    ready = [b.ready_s * scale for b in order]
    wire_factor = (HOOK_WIRE_FACTOR[target.hook] if target.hook is not None
                   else sum(b.wire_bytes for b in order) / max(1, sum(sizes)))
    if target.bucket_cap_mb is not None and target.bucket_cap_mb != base.bucket_cap_mb:
        sizes, ready = rebucket(sizes, ready, target.bucket_cap_mb * 1024 * 1024)
    wire = [s * wire_factor for s in sizes]
    link = target.link.at(n)
    if isinstance(target.link, Links) and not target.link.measured_at(n):
        notes.append(f"no link measured at {n} processes: all-reduce priced with {link.source}")
    costs = [link.allreduce_s(w, n) for w in wire]
    backward_compute = max(0.0, base.get("backward_s") - base.exposed_buckets_s) * scale
    pipeline = simulate(ready, costs, backward_compute)
    sync, wait = base.get("comm_sync_s"), base.get("comm_wait_s")
    interference = base.interference_s
    exposed = sync + wait + pipeline.exposed_s
    step = nocomm + interference + exposed
    data, other = base.get("data_s"), base.get("other_s")
    return _finish(Prediction(
        world_size=n, batch_per_rank=batch, global_batch=batch * n, step_s=step,
        compute_s=step - data - exposed - other, data_s=data, other_s=other, comm_s=pipeline.busy_s + sync,
        comm_exposed_s=exposed, comm_wait_s=wait, interference_s=interference, nocomm_step_s=nocomm,
        samples_per_s=batch * n / step, buckets=len(sizes), wire_bytes=int(sum(wire)), bound="",
        base=base.folder.name, compute_source=source, link=link.source, notes=notes))


def _finish(p: Prediction) -> Prediction:
    shares = {"communication": p.comm_exposed_s - p.comm_wait_s, "data": p.data_s, "compute": p.compute_s,
              "other": p.other_s}
    largest = max(shares, key=lambda k: shares[k])
    p.bound = largest if largest in ("communication", "data") else "compute"
    return p


def with_efficiency(predictions: list[Prediction], baseline: Prediction, strong: bool) -> None:
    """The scaling definitions of docs/contract.md against the baseline world size, predicted on the same link."""
    b, t_b = baseline.world_size, baseline.step_s
    for p in predictions:
        p.efficiency = (t_b * b / (p.world_size * p.step_s)) if strong else t_b / p.step_s


def crossover(points: list[Point], target: Target, limit: int = 65536) -> int | None:
    """Smallest world size from 2 at which the job is predicted communication-bound (None up to ``limit``)."""
    n = 2
    while n <= limit:
        if target.global_batch is not None and n > target.global_batch:
            return None
        if predict(points, replace(target, world_size=n)).bound == "communication":
            return n
        n = n + 1 if n < 64 else n * 2
    return None


def extrapolation_warning(points: list[Point], world_size: int) -> str | None:
    measured = sorted({p.world_size for p in points if not p.is_control})
    if not measured:
        return None
    low, high = measured[0], measured[-1]
    if world_size > EXTRAPOLATION_LIMIT * high or world_size * EXTRAPOLATION_LIMIT < low:
        return (f"world size {world_size} is more than {EXTRAPOLATION_LIMIT}x beyond the measured ones "
                f"({', '.join(map(str, measured))}): an extrapolation, trust it less")
    return None
