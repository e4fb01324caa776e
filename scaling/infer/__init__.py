"""``python -m scaling.infer``: latency against throughput over a sweep of batch sizes (docs/inference.md)."""
