"""The bundle: the contract between export and engine (docs/bundle.md).

A bundle is a directory holding ``medsr.json`` (the manifest) and the three ONNX graphs of `medsr.bundle.graphs`.
This package reads and validates it; it imports nothing above NumPy, medsr.errors and medsr.degrade.
"""

from medsr.bundle.load import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Bundle,
    GraphEntry,
    load_bundle,
    sha256_file,
    write_manifest,
)

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "Bundle", "GraphEntry", "load_bundle", "sha256_file", "write_manifest"]
