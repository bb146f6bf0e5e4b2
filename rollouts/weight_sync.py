"""Full weights (learner.full_finetune) in buckets: from the learner ranks to the driver, and from the
driver to Ray rollout actors, without a second full copy of the model on any process.

An adapter is megabytes and travels as one object (rollouts/ray_pool.py `sync`). Full weights of a
7B language model are ~14 GB in bf16, so they travel as a sequence of buckets of at most
`rollout.weight_bucket_mb`, in parameter order:

    learner ranks: gather one parameter at a time (FSDP2 `DTensor.full_tensor`, a collective every
                   rank joins), rank 0 yields a bucket as it fills (a Ray streaming generator, at most
                   two buckets ahead of the consumer)
    driver:        loads each bucket into its own policy, in place
    rollout actors: every bucket is one `ray.put`; each actor copies it into its parameters and
                   reports a checksum of what it then holds for those names; at most two buckets are in
                   flight, and the new version counts only once every tensor arrived (`finish_weights`)

So every process holds its own weights plus at most two buckets; bytes, buckets and seconds are in
the step's metrics (sync/*, learner/weights_*).
"""
from __future__ import annotations

import time
from collections import deque
from typing import Iterable, Iterator

import torch

DEFAULT_BUCKET_MB = 512.0


def iter_trainable(policy, keep: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full CPU tensor) of every trainable parameter, one at a time. A sharded (FSDP2) parameter
    is gathered with `full_tensor`, which every rank must call in the same order: `keep=False` runs
    the gathers and yields nothing (the ranks whose copy nobody needs)."""
    for name, p in policy.model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            if keep:
                yield name, t.cpu().clone()


def tensor_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[dict]:
    """`named` in order, grouped into dicts of at most `bucket_bytes` (a larger tensor travels alone)."""
    bucket, size = {}, 0
    for name, t in named:
        n = t.numel() * t.element_size()
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = t
        size += n
    if bucket:
        yield bucket


def bucket_bytes(mb: float) -> int:
    return max(1, int(mb * 2 ** 20))


def nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def checksum(state: dict[str, torch.Tensor]) -> float:
    """A cheap fingerprint of named tensors: a sampler reports it back after loading."""
    return float(sum(t.detach().double().sum().item() + t.detach().double().abs().sum().item() * 1e-3
                     for _, t in sorted(state.items())))


class NamedLoader:
    """The receiving side (a rollout actor): copy named buckets into a model's parameters in place, and
    count what arrived for each version."""

    def __init__(self, model):
        self.params = dict(model.named_parameters())
        self.arrived: dict[int, set] = {}

    @torch.no_grad()
    def load(self, state: dict, version: int) -> float:
        unknown = sorted(set(state) - set(self.params))
        if unknown:
            raise ValueError(f"full weights do not fit this policy: {unknown[:3]}")
        for name, t in state.items():
            self.params[name].copy_(t)
        self.arrived.setdefault(version, set()).update(state)
        return checksum({n: self.params[n] for n in state})

    def finish(self, version: int, expected: int):
        got = len(self.arrived.pop(version, ()))
        self.arrived = {}
        if got != expected:
            raise RuntimeError(f"full-weight sync to version {version}: {got} of {expected} tensors arrived")


def send_buckets(policy, handles: dict, version: int, bucket_mb: float, on_failure) -> dict:
    """Send `policy`'s trainable tensors to the actors `handles` ({index: handle}) bucket by bucket,
    at most two buckets in flight; check every actor's checksum of every bucket, then tell them the
    version. `on_failure(index, err)` handles an actor that died (a restart, then a resend)."""
    import ray

    def _is_actor_failure(e):
        return isinstance(e, ray.exceptions.RayActorError)

    t0, inflight, failed = time.perf_counter(), deque(), {}
    stats = {"sync/bytes": 0.0, "sync/buckets": 0.0, "sync/max_bucket_bytes": 0.0, "sync/tensors": 0.0}
    loads = []

    def settle(item):
        expected, acks = item
        for i, ack in acks:
            try:
                out = ray.get(ack)
            except Exception as e:  # noqa: BLE001 - only actor failures are handled
                if not _is_actor_failure(e):
                    raise
                failed.setdefault(i, e)
                continue
            loads.append(out["seconds"])
            if abs(out["checksum"] - expected) > 1e-5 * max(1.0, abs(expected)):
                raise RuntimeError(f"rollout actor {i} holds different weights after a bucket of version {version} "
                                   f"(checksum {out['checksum']} != {expected})")

    for bucket in tensor_buckets(iter_trainable(policy), bucket_bytes(bucket_mb)):
        ref = ray.put(bucket)
        acks = [(i, h.load_weights.remote([ref], version)) for i, h in handles.items() if i not in failed]
        inflight.append((checksum(bucket), acks))
        size = nbytes(bucket)
        stats["sync/bytes"] += size
        stats["sync/buckets"] += 1
        stats["sync/tensors"] += len(bucket)
        stats["sync/max_bucket_bytes"] = max(stats["sync/max_bucket_bytes"], float(size))
        del bucket, ref  # the object store keeps it until the actors have it
        while len(inflight) > 1:
            settle(inflight.popleft())
    while inflight:
        settle(inflight.popleft())
    finish = [(i, h.finish_weights.remote(version, int(stats["sync/tensors"])))
              for i, h in handles.items() if i not in failed]
    for i, ref in finish:
        try:
            ray.get(ref)
        except Exception as e:  # noqa: BLE001
            if not _is_actor_failure(e):
                raise
            failed.setdefault(i, e)
    for i, err in failed.items():
        on_failure(i, err)
    stats["sync/actor_load_seconds"] = max(loads) if loads else 0.0
    stats["sync/seconds"] = time.perf_counter() - t0
    return stats
