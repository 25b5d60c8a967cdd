"""Preprocessing: the one resumable cache (keyed by settings and source-file identity), CT windows, MRI slicing."""
