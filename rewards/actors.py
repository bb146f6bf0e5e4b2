"""Ray helpers shared by reward actors (here) and rollout actors (rollouts/ray_pool.py).

They live in the rewards layer because it is the lower of the two that run Ray actors: rollouts
import rewards, never the reverse.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

RESTART_WAIT_S = 300  # how long a dead actor may take to come back before we give up


def init_ray(ray_cfg=None) -> bool:
    """Start or join Ray as `ray_cfg` (address, num_cpus, temp_dir; None = defaults) says; returns True
    when this call started a local Ray.

    address null -> a local Ray in this process' session (`ray.init(num_cpus=..., _temp_dir=...)`);
    `auto` or host:port -> join a running cluster (`ray start --head` + `ray start --address=...`).
    An already initialised Ray (a test fixture, a notebook) is reused as it is.
    """
    import ray

    if ray.is_initialized():
        return False
    address = getattr(ray_cfg, "address", None) if ray_cfg is not None else None
    if address:
        ray.init(address=address, log_to_driver=True)  # the cluster's own auth settings apply
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray needs no token (Ray >= 2.50)
    kwargs = {"include_dashboard": False}
    if ray_cfg is not None and ray_cfg.num_cpus is not None:
        kwargs["num_cpus"] = ray_cfg.num_cpus
    if ray_cfg is not None and ray_cfg.temp_dir:
        kwargs["_temp_dir"] = str(Path(ray_cfg.temp_dir).absolute())
    ray.init(**kwargs)
    return True


def wait_for_restart(handle, name: str, restarts: int, limit: str, err: BaseException,
                     timeout: float = RESTART_WAIT_S) -> int:
    """A call on the restartable actor `handle` failed with `err`: wait until Ray has brought it back
    and return the pid now serving it (the caller counts a restart when it changed), or raise a
    RuntimeError naming the actor (`name`), how often it was restarted and the `limit` setting."""
    import ray

    deadline, died = time.monotonic() + timeout, 0
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    while True:
        try:
            return ray.get(handle.pid.remote(), timeout=timeout)
        except ray.exceptions.ActorDiedError as e:
            died += 1  # a fresh call on a restartable actor is queued; repeated "died" = gone for good
            if died >= 3 or time.monotonic() > deadline:
                raise RuntimeError(f"{name} died and Ray will not restart it again: it was restarted {restarts} "
                                   f"time(s), {limit}. Last error: {first_line}") from e
            time.sleep(0.5)
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError) as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not come back within {timeout:g} s after: {first_line}") from e
            time.sleep(0.2)
