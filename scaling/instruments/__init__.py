"""Measurements taken during training, one per module.

- ``clock``     host or CUDA-event timestamps
- ``timing``    per-step phases: data, forward, backward, optimizer, other
- ``comm``      gradient all-reduce busy and exposed time, bytes, bandwidth
- ``memory``    bytes per rank by category
- ``flops``     FLOPs per sample, peak FLOP/s probe, MFU
- ``aggregate`` cross-rank mean/min/max and the summary of a run
"""
