"""Preprocessing: crop to the nonzero region, normalize, resample, and the on-disk cache."""
