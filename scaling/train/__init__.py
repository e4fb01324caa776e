"""One instrumented DDP training job: ``python -m scaling.train`` (``job``), its loop, model, data, hooks, failure."""
