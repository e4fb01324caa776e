"""The α–β models and their fit: known parameters come back out of synthetic timings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scaling.bench import commfit

SIZES_BYTES = [2.0**k for k in range(10, 27)]  # 1 KiB .. 64 MiB


@pytest.mark.parametrize(
    "op, world_size, factor",
    [
        ("all_reduce", 2, 1.0),
        ("all_reduce", 8, 1.75),
        ("all_gather", 4, 0.75),
        ("reduce_scatter", 4, 0.75),
        ("broadcast", 8, 1.0),
        ("all_reduce", 1, 0.0),
    ],
)
def test_bus_factor_matches_nccl_tests(op: str, world_size: int, factor: float) -> None:
    assert commfit.bus_factor(op, world_size) == pytest.approx(factor)


def test_ring_all_reduce_time_is_textbook() -> None:
    # 4 ranks, α = 10 µs, B = 1 GB/s, 1 GB: 6 latency steps and 1.5 GB over each link.
    time_s = commfit.model_time_s("all_reduce", 4, 1e9, 10e-6, 1e9)
    assert time_s == pytest.approx(6 * 10e-6 + 1.5)


@pytest.mark.parametrize("op", commfit.OPS)
@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_fit_recovers_alpha_and_bandwidth_from_noisy_timings(op: str, world_size: int) -> None:
    alpha_s, bandwidth_Bps = 25e-6, 3e9
    rng = np.random.default_rng(world_size)
    times_s = [
        commfit.model_time_s(op, world_size, s, alpha_s, bandwidth_Bps) * (1 + rng.uniform(-0.03, 0.03))
        for s in SIZES_BYTES
    ]
    fitted = commfit.fit(op, "torch", world_size, SIZES_BYTES, times_s)
    assert fitted is not None
    assert fitted.alpha_s == pytest.approx(alpha_s, rel=0.05)
    assert fitted.bandwidth_GBps == pytest.approx(3.0, rel=0.05)
    assert fitted.rms_rel_error < 0.03
    # The fitted curve's bus bandwidth saturates at the link bandwidth.
    assert fitted.busbw_GBps(2.0**40) == pytest.approx(3.0, rel=0.06)


def test_fit_is_exact_without_noise() -> None:
    times_s = [commfit.model_time_s("all_gather", 4, s, 7e-6, 12.5e9) for s in SIZES_BYTES]
    fitted = commfit.fit("all_gather", "mpi", 4, SIZES_BYTES, times_s)
    assert fitted is not None
    assert fitted.alpha_s == pytest.approx(7e-6, rel=1e-9)
    assert fitted.bandwidth_GBps == pytest.approx(12.5, rel=1e-9)
    assert fitted.record() == {"op": "all_gather", "transport": "mpi", "alpha_s": fitted.alpha_s,
                               "bandwidth_GBps": fitted.bandwidth_GBps, "rms_rel_error": fitted.rms_rel_error}


def test_pure_bandwidth_timings_give_zero_latency_not_a_negative_one() -> None:
    # Timings that fall slightly below a pure S/B line would give α < 0 unconstrained.
    times_s = [commfit.model_time_s("all_reduce", 2, s, 0.0, 1e9) * (0.98 if s < 1e5 else 1.0) for s in SIZES_BYTES]
    fitted = commfit.fit("all_reduce", "torch", 2, SIZES_BYTES, times_s)
    assert fitted is not None
    assert fitted.alpha_s == 0.0
    assert fitted.bandwidth_GBps == pytest.approx(1.0, rel=0.02)


def test_latency_only_timings_give_no_bandwidth() -> None:
    fitted = commfit.fit("broadcast", "torch", 4, SIZES_BYTES, [30e-6] * len(SIZES_BYTES))
    assert fitted is not None
    assert fitted.bandwidth_GBps is None
    assert fitted.alpha_s == pytest.approx(10e-6)
    assert math.isinf(fitted.bandwidth_Bps)


def test_no_fit_with_one_rank_or_one_size() -> None:
    assert commfit.fit("all_reduce", "torch", 1, SIZES_BYTES, [1e-5] * len(SIZES_BYTES)) is None
    assert commfit.fit("all_reduce", "torch", 2, [1024.0], [1e-5]) is None


def test_unknown_op_is_refused() -> None:
    with pytest.raises(ValueError, match="all_to_all"):
        commfit.bus_factor("all_to_all", 2)
