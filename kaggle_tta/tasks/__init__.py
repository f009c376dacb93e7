"""What differs per task once predictions are cached: merging, metrics and writers.

These modules import numpy (and polars), never torch: re-blending runs without a model.
"""
