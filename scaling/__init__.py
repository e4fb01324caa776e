"""scaling: measure where the time, memory and FLOPs of a distributed training job go."""

__version__ = "0.1.0"
