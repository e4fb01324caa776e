"""Measurements taken during training, one per module.

- ``clock``         host or CUDA-event timestamps
- ``timing``        per-step phases: data, forward, backward, optimizer, other
- ``comm``          gradient all-reduce busy and exposed time, bytes, bandwidth
- ``sharded``       the collectives of ZeRO-1 and FSDP, timed where they are issued
- ``memory``        bytes per rank by category
- ``memory_model``  the model state per rank predicted from the parameter shapes
- ``flops``         FLOPs per sample, peak FLOP/s probe, MFU
- ``membw``         the memory-bandwidth probe
- ``probecache``    the probes' cache, per host, device, dtype and threads
- ``ops``           the operator profile: time, FLOPs and bytes per operator
- ``roofline``      operators sorted against the measured ridge

The cross-rank reduction of what they measure is ``scaling.records.aggregate``.
"""
