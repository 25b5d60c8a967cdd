"""Synthetic data in real file formats, for demos and tests: CT (RSNA layout), MRI phantoms (NIfTI / ADNI layout),
MNIST splotches, image folders."""
