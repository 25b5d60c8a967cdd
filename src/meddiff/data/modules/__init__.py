"""The DataModules, one per source (exported from :mod:`meddiff.data`)."""
