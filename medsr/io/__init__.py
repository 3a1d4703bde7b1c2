"""Medical image I/O: NIfTI (and later DICOM, PNG, TIFF), intensity normalization and the affine update."""
