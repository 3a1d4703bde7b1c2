"""Training pairs from real images: named sources and the default split (``sources``), file readers
(``images``), normalized slices, degradation per modality and aligned HR/LR crops (``pairs``)."""
