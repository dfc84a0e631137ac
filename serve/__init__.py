"""The carclf Ray Serve application (``serve run serve/config.yaml``)."""
