"""The collective microbenchmark (``commbench``), its latency/bandwidth fit and its plot."""
