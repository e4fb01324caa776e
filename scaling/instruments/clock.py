"""Timestamps that can be turned into seconds later.

On CPU a mark is ``time.perf_counter()``. On CUDA it is an event recorded on the
current stream of the clock's own device: nothing synchronises until
``seconds_between`` is asked, which the loop does only at log intervals (docs/contract.md:
no ``synchronize()`` per step). The device is the clock's, not the calling thread's:
a completion is stamped from the backend's worker thread (gloo's), whose current
device is GPU 0 whatever the rank's, and two events on different GPUs cannot be
compared.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch


class Clock(Protocol):
    def mark(self) -> Any: ...

    def seconds_between(self, start: Any, end: Any) -> float: ...


class HostClock:
    def mark(self) -> float:
        return time.perf_counter()

    def seconds_between(self, start: float, end: float) -> float:
        return end - start


class CudaClock:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds_between(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds


def clock_for(device: torch.device) -> Clock:
    return CudaClock(device) if device.type == "cuda" else HostClock()
