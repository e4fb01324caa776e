"""Scaling studies: ``python -m scaling.study`` runs every point as a real multi-process job, then the report."""
