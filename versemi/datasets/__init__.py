"""Raw datasets: layout, image I/O with geometry, integrity checks, converters, synthetic data."""
