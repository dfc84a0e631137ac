"""Entrypoints submitted with ``ray job submit``: thin wrappers over the carclf library."""
