"""The records of a run, the one contract between training and reporting: their schema, files and reduction.

Nothing in this package imports torch.
"""
