"""ADNI slices (seed 004): ``volumes`` (per-volume access), ``dataset`` (slices as items), ``datamodule``."""
