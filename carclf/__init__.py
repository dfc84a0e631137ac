"""carclf: distributed tune-and-serve for fine-grained image classification on Ray."""

__version__ = "0.1.0"
