"""Datasets: TFDS builders for FER+, CK+ and the built-in synthetic faces, and `load`."""
