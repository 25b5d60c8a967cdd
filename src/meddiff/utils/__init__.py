"""Glue for the Hydra entry points: instantiation, run directories, resume, atomic writes."""
