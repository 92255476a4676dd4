"""reid-batch: measure how much a medical-imaging classifier leaks about its training patients."""

__version__ = "0.1.0"
MANIFEST_VERSION = 1
