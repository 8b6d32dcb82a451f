"""iota: pipeline-parallel pretraining over untrusted machines."""

__version__ = "0.1.0"
