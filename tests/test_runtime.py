"""carclf pins the Ray it starts, so a second Ray on the machine breaks nothing (issue 15)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# Inside a task, as Ray Train's placement-group cleaner does: the state API with no address.
# Before carclf pinned its instance this raised "Found multiple active Ray instances".
SCRIPT = textwrap.dedent(
    """
    import ray
    from carclf.runtime import ensure_ray

    ensure_ray(num_cpus=1)

    @ray.remote(num_cpus=0)
    def actors_seen():
        from ray.util.state import list_actors
        return len(list_actors())

    print("state api ok", ray.get(actors_seen.remote()))
    ray.shutdown()
    """
)


@pytest.mark.integration
@pytest.mark.slow
def test_state_api_inside_tasks_with_two_ray_instances(ray_session) -> None:
    """The test session's Ray is one instance; a subprocess starts a second and queries state."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_ADDRESS"] = "local"  # as the issue reports: a new instance beside the running one
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=240
    )
    assert "state api ok" in out.stdout, out.stderr[-3000:]
    assert "Found multiple active Ray instances" not in out.stderr
