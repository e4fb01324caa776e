"""Processes and process groups: who launched us (``layout``, ``detect``, ``mpi``), threads, the group itself."""
