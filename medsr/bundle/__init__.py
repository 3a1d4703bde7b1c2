"""The bundle: the contract between export and engine (docs/bundle.md).

A bundle is a directory holding ``medsr.json`` (the manifest, typed in `medsr.bundle.manifest`) and the three ONNX
graphs of `medsr.bundle.graphs`. This package reads and validates it; it imports nothing above NumPy, medsr.errors
and medsr.degrade.
"""

from medsr.bundle.load import MANIFEST_NAME, Bundle, load_bundle, read_manifest, sha256_file, write_manifest
from medsr.bundle.manifest import FORMAT_VERSION, GraphEntry, Manifest

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Bundle",
    "GraphEntry",
    "Manifest",
    "load_bundle",
    "read_manifest",
    "sha256_file",
    "write_manifest",
]
