"""Connecting to Ray: one place that decides how carclf starts or joins a Ray instance."""

from __future__ import annotations


def ensure_ray() -> None:
    """Join the Ray instance already running in this process, or start a local one.

    ``ray.init()`` with no address joins the cluster named by ``RAY_ADDRESS`` (as under
    ``ray job submit``) or starts a local single-node Ray. Workers log at WARNING: Ray Train's
    per-report INFO lines would drown carclf's one progress line per epoch.
    """
    import ray

    if not ray.is_initialized():
        ray.init(logging_config=ray.LoggingConfig(log_level="WARNING"))
