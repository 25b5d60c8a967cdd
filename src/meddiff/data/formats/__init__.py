"""File formats: readers and writers of one format each (DICOM, NIfTI, MNIST IDX, RSNA labels, ADNI dataset.json,
HDF5 patch files). No Lightning, no caching, no splits."""
