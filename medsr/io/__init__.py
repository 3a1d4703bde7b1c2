"""Medical image I/O: NIfTI, DICOM, PNG and TIFF readers and writers, intensity windows, the affine update and atomic
writes (docs/conventions.md for the geometry, the window and the world frames)."""
