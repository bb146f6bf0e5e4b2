"""Rollouts on Ray: N actors each wrapping a `RolloutWorker`, adapter-only weight sync, restarts.

The learner stays in the driver. Per step the pool shards every request across the actors
(`RolloutRequest.shard`), and reassembles the shards in exactly the order the in-process worker
produces (for each prompt in request order, its num_generations samples). Every sample's randomness
derives from (seed, step, prompt index, sample index), so the reassembled batch holds the same
tokens as an in-process run with the same seed.

Weight sync ships only the LoRA tensors: one `ray.put` of `policy.adapter_state_dict()`, then each
actor gets the object and loads it, tagged with a version. Every rollout records the version it was
sampled with (`batch.version`); the pool checks the learner's version against it before returning
(`rollout.max_staleness`, 0 = strictly on-policy), so an adapter that never reaches the samplers is
an error, not a run that silently trains nothing.

Faults: an actor process that dies is restarted by Ray (`rollout.max_restarts`); its `__init__`
reloads the base model, and since every generate call carries the adapter's object ref and version,
the restarted actor loads the adapter it needs before sampling. The unfinished shard is re-submitted
with the same adapter version, so the step gets the same samples, none lost, none duplicated.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
import warnings
from dataclasses import dataclass, field

import ray
import torch

from ..policies.batches import concat_rollouts
from ..policies.registry import PolicySpec, build_policy, resolve_checkpoint
from ..rewards.actors import init_ray, wait_for_restart
from .weight_sync import DEFAULT_BUCKET_MB, NamedLoader, send_buckets
from .weight_sync import checksum as adapter_checksum
from .weight_sync import nbytes as state_nbytes
from .worker import RolloutRequest, RolloutWorker, Sampling

ACTOR_START_TIMEOUT_S = 600  # a pending actor (no free CPU/GPU in the cluster) fails after this


# ----------------------------------------------------------------------------- helpers
def _quiet_hf():
    # Every actor loads a model: without this each prints transformers' progress bars into the driver log.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # transformers missing or changed: noise only
        pass


# ----------------------------------------------------------------------------- the actor
class RolloutActor:
    """Body of the Ray actor: one `RolloutWorker` with its own copy of the policy `spec` describes."""

    def __init__(self, spec: PolicySpec, sampling: Sampling, seed: int, num_threads: int):
        _quiet_hf()
        torch.set_num_threads(max(1, num_threads))
        self.policy = build_policy(spec)
        self.worker = RolloutWorker(self.policy, sampling, seed)

    def ready(self) -> dict:
        return self.info()

    def info(self) -> dict:
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "version": self.worker.version}

    def pid(self) -> int:
        return os.getpid()

    def image_size(self) -> int:
        return self.policy.image_size

    def set_adapter(self, box: list, version: int) -> dict:
        """Load the adapter tensors behind `box[0]` (an ObjectRef, boxed so Ray does not resolve it
        for us: the actor decides when to fetch); returns load time and a checksum of what it holds."""
        t0 = time.perf_counter()
        state = ray.get(box[0])
        self.worker.set_adapter(state, version)
        return {"seconds": time.perf_counter() - t0, "version": version,
                "checksum": adapter_checksum(self.policy.adapter_state_dict())}

    def generate(self, request: RolloutRequest, box: list, version: int):
        if self.worker.version != version:
            if box[0] is None:
                raise RuntimeError(f"rollout actor holds adapter version {self.worker.version}, the step asks "
                                   f"for version {version} but no adapter tensors were sent")
            self.set_adapter(box, version)  # a restarted actor catches up here
        t0 = time.perf_counter()
        batch = self.worker.generate(request)
        return batch, {**self.info(), "seconds": time.perf_counter() - t0}

    def teacher_forced_logprobs(self, batch, mode: str) -> torch.Tensor:
        """The actor's own teacher-forced log-probs of `batch` (diagnostics and tests)."""
        with torch.no_grad():
            return self.policy.rollout_logprobs(batch, mode).cpu()

    def adapter_state(self) -> dict:
        return self.policy.adapter_state_dict()

    # learner.full_finetune: full weights arrive in buckets (rollouts/weight_sync.py)
    def load_weights(self, box: list, version: int) -> dict:
        t0 = time.perf_counter()
        if getattr(self, "loader", None) is None:
            self.loader = NamedLoader(self.policy.model)
        sums = self.loader.load(ray.get(box[0]), version)
        return {"seconds": time.perf_counter() - t0, "checksum": sums}

    def finish_weights(self, version: int, tensors: int) -> dict:
        """Every bucket of `version` arrived: from now on this actor samples with it."""
        self.loader.finish(version, tensors)
        self.policy.version = version
        return self.info()


def _is_actor_failure(err: BaseException) -> bool:
    return isinstance(err, ray.exceptions.RayActorError)


@dataclass
class _ActorSlot:
    index: int
    handle: object
    pid: int
    node_id: str
    restarts: int = 0


@dataclass
class _ShardJob:
    request_index: int
    request: RolloutRequest
    actor: int
    box: list
    version: int
    future: object = None


@dataclass
class PendingRollouts:
    """Shards in flight for one list of requests; `RayWorkerPool.collect` turns it into batches."""

    requests: list[RolloutRequest]
    jobs: list[_ShardJob]
    submitted_at: float = field(default_factory=time.perf_counter)
    provenance: list[list[dict]] = field(default_factory=list)  # per request, per row: node_id, pid, actor

    def matches(self, requests: list[RolloutRequest]) -> bool:
        return len(requests) == len(self.requests) and all(_same_request(a, b) for a, b in zip(requests, self.requests))


def _same_request(a: RolloutRequest, b: RolloutRequest) -> bool:
    if (a.kind, a.prompts, a.num_generations, a.step, a.prompt_indices, a.targets) != \
            (b.kind, b.prompts, b.num_generations, b.step, b.prompt_indices, b.targets):
        return False
    if (a.images is None) != (b.images is None):
        return False
    return a.images is None or torch.equal(a.images, b.images)


# ----------------------------------------------------------------------------- the pool
class RayWorkerPool:
    """`rollout.num_workers` Ray actors behind the trainer's pool interface.

    generate(requests, version) -> list[batch]   (one batch per request, in-process row order)
    generate_stream(requests, version, n_chunks)  (yields (request, chunk, batch) as chunks come back)
    sync(policy, version)                         (after every update: adapter tensors only)
    metrics() -> dict                             (sync/bytes, sync/seconds, rollout/restarts, ...)
    close()

    `submit` / `collect` split `generate` in two so a caller can keep the actors busy while it works
    (rollout jobs; `rollout.one_step_off`).
    """

    def __init__(self, spec: PolicySpec, sampling: Sampling, settings, seed: int, ray_cfg=None,
                 full_weights: bool = False):
        """`spec`: the policy every actor builds (a `tiny` one is built here, once, before the actors
        start); `settings`: num_workers, num_cpus_per_worker, num_gpus_per_worker, max_restarts,
        max_staleness, one_step_off (the `rollout` config section); `ray_cfg`: address, num_cpus,
        temp_dir (the `ray` section) or None; `full_weights`: sync every trainable tensor of a fully
        fine-tuned policy, bucket by bucket (rollouts/weight_sync.py), instead of its adapter."""
        rc = settings
        self.full_weights, self._full_source = full_weights, None
        if rc.num_workers < 1:
            raise ValueError(f"rollout.num_workers must be >= 1 for a Ray pool, got {rc.num_workers}")
        self.rc, self.ray_cfg = rc, ray_cfg
        self.started_ray = init_ray(ray_cfg)
        self._check_resources()
        device = "cuda" if rc.num_gpus_per_worker > 0 else "cpu"
        spec = dataclasses.replace(resolve_checkpoint(spec), load={**spec.load, "device": device},
                                   gradient_checkpointing=False)
        actor_cls = ray.remote(RolloutActor)
        handles = [actor_cls.options(num_cpus=rc.num_cpus_per_worker, num_gpus=rc.num_gpus_per_worker,
                                     max_restarts=rc.max_restarts, max_task_retries=0,
                                     name=None).remote(spec, sampling, seed, max(1, int(rc.num_cpus_per_worker)))
                   for _ in range(rc.num_workers)]
        self.slots: list[_ActorSlot] = []
        ready = [h.ready.remote() for h in handles]
        done, pending = ray.wait(ready, num_returns=len(ready), timeout=ACTOR_START_TIMEOUT_S)
        if pending:
            for h in handles:
                ray.kill(h)
            raise RuntimeError(
                f"{len(pending)} of {len(handles)} rollout actors did not start within {ACTOR_START_TIMEOUT_S} s: "
                f"each asks for {rc.num_cpus_per_worker} CPU and {rc.num_gpus_per_worker} GPU "
                f"(rollout.num_cpus_per_worker / rollout.num_gpus_per_worker); the cluster has "
                f"{ray.cluster_resources()}")
        for i, (h, ref) in enumerate(zip(handles, ready)):
            info = ray.get(ref)  # raises the actor's own error (bad model path...) if __init__ failed
            self.slots.append(_ActorSlot(i, h, info["pid"], info["node_id"]))
        self.version = 0  # version of the adapter the actors were last synced with
        self.box: list = [None]  # [ObjectRef of the adapter tensors] once synced
        self.restarts = 0
        self._sync_stats: dict = {}
        self._pending_acks: tuple | None = None
        self._last: dict = {}
        self._prefetch: PendingRollouts | None = None

    # ------------------------------------------------------------------ setup helpers
    def _check_resources(self):
        rc, res = self.rc, ray.cluster_resources()
        need = {"CPU": rc.num_workers * rc.num_cpus_per_worker, "GPU": rc.num_workers * rc.num_gpus_per_worker}
        for kind, n in need.items():
            have = res.get(kind, 0.0)
            if n > have + 1e-9:
                msg = (f"rollout.num_workers={rc.num_workers} actors x rollout.num_{kind.lower()}s_per_worker="
                       f"{getattr(rc, f'num_{kind.lower()}s_per_worker')} need {n:g} {kind}s, but the Ray cluster "
                       f"has {have:g}")
                if getattr(self.ray_cfg, "address", None):  # an autoscaling cluster may still grow: warn only
                    warnings.warn(msg, stacklevel=3)
                else:
                    raise ValueError(msg + (" (raise ray.num_cpus)" if kind == "CPU" else ""))

    @property
    def num_workers(self) -> int:
        return len(self.slots)

    def actor_pids(self) -> list[int]:
        return [s.pid for s in self.slots]

    def actor_handles(self) -> list:
        return [s.handle for s in self.slots]

    # ------------------------------------------------------------------ sampling
    def submit(self, requests: list[RolloutRequest]) -> PendingRollouts:
        """Send every request's shards to the actors (shard s -> actor s) with the current adapter."""
        jobs = []
        for ri, req in enumerate(requests):
            for s, shard in enumerate(req.shard(self.num_workers)):
                job = _ShardJob(ri, shard, s, self.box, self.version)
                self._launch(job)
                jobs.append(job)
        return PendingRollouts(list(requests), jobs)

    def _launch(self, job: _ShardJob):
        job.future = self.slots[job.actor].handle.generate.remote(job.request, job.box, job.version)

    def collect(self, pending: PendingRollouts) -> list:
        """Wait for the shards, re-submitting those whose actor died; reassemble in in-process order."""
        batches = dict(self.collect_iter(pending))
        return [batches[ri] for ri in range(len(pending.requests))]

    def collect_iter(self, pending: PendingRollouts):
        """Yield (request index, batch) as soon as every shard of that request is back, re-submitting
        shards whose actor died; each batch in in-process row order."""
        results: dict[int, tuple] = {}
        left = {ri: {k for k, j in enumerate(pending.jobs) if j.request_index == ri}
                for ri in range(len(pending.requests))}
        pending.provenance = [None] * len(pending.requests)
        by_future = {j.future: k for k, j in enumerate(pending.jobs)}
        while by_future:
            ready, _ = ray.wait(list(by_future), num_returns=1)
            k = by_future.pop(ready[0])
            job = pending.jobs[k]
            try:
                results[k] = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - only actor failures are retried
                if not _is_actor_failure(e):
                    raise
                self._recover(job.actor, e)
                self._launch(job)  # same shard, same adapter version: same samples
                by_future[job.future] = k
                continue
            # a shard sent to an actor that was already restarting succeeds on the new process: count it too
            self._note_pid(job.actor, results[k][1]["pid"], results[k][1]["node_id"])
            ri = job.request_index
            left[ri].discard(k)
            if not left[ri]:
                ks = sorted(k2 for k2, j in enumerate(pending.jobs) if j.request_index == ri)
                batch, pending.provenance[ri] = self._assemble(pending, ri, ks, results)
                self._last = {"rollout/wait_seconds": time.perf_counter() - pending.submitted_at}
                yield ri, batch

    def _assemble(self, pending: PendingRollouts, ri: int, ks: list[int], results: dict):
        req = pending.requests[ri]
        parts = [results[k][0] for k in ks]
        # rows of shard k: its prompts (their positions in the request) x num_generations
        pos = {pi: i for i, pi in enumerate(req.prompt_indices)}
        keys, rows_info = [], []
        for k in ks:
            info = results[k][1]
            for pi in pending.jobs[k].request.prompt_indices:
                for s in range(req.num_generations):
                    keys.append((pos[pi], s))
                    rows_info.append({"node_id": info["node_id"], "pid": info["pid"], "actor": pending.jobs[k].actor})
        order = sorted(range(len(keys)), key=keys.__getitem__)
        batch = concat_rollouts(parts).select(order)
        # a re-submitted or prefetched shard may carry an older version: the batch reports the oldest
        batch = dataclasses.replace(batch, version=min(p.version for p in parts))
        return batch, [rows_info[i] for i in order]

    def _recover(self, index: int, err: BaseException):
        """An actor call failed: wait for Ray's restart, count it, or give up with a clear error."""
        slot = self.slots[index]
        pid = wait_for_restart(slot.handle, f"rollout actor {index}", slot.restarts,
                               f"rollout.max_restarts={self.rc.max_restarts}", err)
        self._note_pid(index, pid)
        if self.full_weights and self._full_source is not None:  # the new process holds the base weights
            self.sync_full(self._full_source, self.version, [index])

    def _note_pid(self, index: int, pid: int, node_id: str | None = None):
        """A new process behind actor `index` = one restart (several failed calls may share it)."""
        slot = self.slots[index]
        if pid == slot.pid:
            return
        slot.pid = pid
        slot.restarts += 1
        self.restarts += 1
        if slot.restarts > self.rc.max_restarts:
            raise RuntimeError(f"rollout actor {index} was restarted {slot.restarts} times "
                               f"(> rollout.max_restarts={self.rc.max_restarts}); giving up")
        slot.node_id = node_id or ray.get(slot.handle.info.remote())["node_id"]

    def generate(self, requests: list[RolloutRequest], version: int) -> list:
        """One batch per request, in-process row order."""
        out = {ri: b for ri, _, b in self.generate_stream(requests, version)}
        return [out[ri] for ri in range(len(requests))]

    def generate_stream(self, requests: list[RolloutRequest], version: int, num_chunks: int = 1,
                        next_requests: list[RolloutRequest] | None = None):
        """Yield (request index, chunk index, batch) as each chunk (`RolloutRequest.split`) comes back.

        Every chunk is sharded across the actors and the chunks are queued in order, so chunk 0 is
        back first and the caller can score it while the actors sample the rest. With
        `rollout.one_step_off`, `next_requests` (the next step's) are queued behind them at once."""
        if version != self.version:
            raise RuntimeError(
                f"the learner is at adapter version {version} but the rollout actors were last synced with "
                f"version {self.version}: call pool.sync(policy, version) after every update, or the "
                f"samplers keep using stale weights")
        split = [r.split(num_chunks) for r in requests]
        index = [(ri, ci) for ri, cs in enumerate(split) for ci in range(len(cs))]
        chunks = [c for cs in split for c in cs]
        if self._prefetch is not None and self._prefetch.matches(chunks):
            pending, prefetched = self._prefetch, True
        else:
            self._cancel_prefetch()
            pending, prefetched = self.submit(chunks), False
        self._prefetch = None
        if self.rc.one_step_off and next_requests:
            # queued behind this step's shards: the actors move on to step k+1 while we train on k
            self._prefetch = self.submit([c for r in next_requests for c in r.split(num_chunks)])
        lag = 0
        for k, batch in self.collect_iter(pending):
            lag = max(lag, check_staleness([batch], version, self.rc.max_staleness))
            yield (*index[k], batch)
        self._finish_acks()
        self._last.update({"rollout/version_lag": lag, "rollout/prefetched": float(prefetched)})

    def _cancel_prefetch(self):
        if self._prefetch is not None:
            for j in self._prefetch.jobs:
                ray.cancel(j.future)  # best effort; the results are dropped either way
            self._prefetch = None

    # ------------------------------------------------------------------ weights
    def sync(self, policy, version: int):
        """Ship the learner's adapter: one put, one get per actor, tagged with `version` (full weights:
        bucket by bucket, `sync_full`)."""
        if self.full_weights:
            return self.sync_full(policy, version)
        t0 = time.perf_counter()
        state = policy.adapter_state_dict()
        ref = ray.put(state)
        self.box, self.version = [ref], version
        acks = [(i, s.handle.set_adapter.remote(self.box, version)) for i, s in enumerate(self.slots)]
        self._sync_stats = {"sync/bytes": float(state_nbytes(state)), "sync/tensors": float(len(state))}
        self._pending_acks = (adapter_checksum(state), version, acks)
        if not self.rc.one_step_off:
            self._finish_acks()
        # with one_step_off the actors are busy with the prefetched step and load this right after it;
        # the acks are checked at the next generate
        self._sync_stats["sync/seconds"] = time.perf_counter() - t0

    def sync_full(self, policy, version: int, actors: list[int] | None = None):
        """Every trainable tensor of `policy` to the actors (all, or `actors`), in buckets of at most
        rollout.weight_bucket_mb; an actor restarted meanwhile gets them again."""
        self._full_source = policy
        handles = {i: self.slots[i].handle for i in (range(len(self.slots)) if actors is None else actors)}
        stats = send_buckets(policy, handles, version, getattr(self.rc, "weight_bucket_mb", DEFAULT_BUCKET_MB),
                             self._recover)
        self.version, self.box = version, [None]
        if actors is None:
            self._sync_stats = stats

    def _finish_acks(self):
        """Wait for the actors' acknowledgements of the last sync and check what they loaded."""
        if not self._pending_acks:
            return
        expected, version, acks = self._pending_acks
        self._pending_acks = None
        loads = []
        for i, ack in acks:
            try:
                out = ray.get(ack)
            except Exception as e:  # noqa: BLE001
                if not _is_actor_failure(e):
                    raise
                self._recover(i, e)  # the restarted actor loads this version with its next shard
                continue
            loads.append(out["seconds"])
            if abs(out["checksum"] - expected) > 1e-5 * max(1.0, abs(expected)):
                raise RuntimeError(f"rollout actor {i} holds different adapter tensors after sync to version "
                                   f"{version} (checksum {out['checksum']} != {expected})")
        self._sync_stats["sync/actor_load_seconds"] = max(loads) if loads else 0.0

    def metrics(self) -> dict:
        return {**self._sync_stats, **self._last, "rollout/restarts": float(self.restarts),
                "rollout/workers": float(self.num_workers)}

    def close(self):
        self._cancel_prefetch()
        for s in self.slots:
            try:
                ray.kill(s.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.slots = []
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


def check_staleness(batches, learner_version: int, max_staleness: int) -> int:
    """Raise when a rollout was sampled with an adapter too old for the learner; return the max lag."""
    lag = 0
    for b in batches:
        if b.version > learner_version:
            raise RuntimeError(f"a {b.kind} rollout reports adapter version {b.version}, newer than the "
                               f"learner's {learner_version}: versions are out of order")
        lag = max(lag, learner_version - b.version)
        if learner_version - b.version > max_staleness:
            raise RuntimeError(
                f"a {b.kind} rollout was sampled with adapter version {b.version} but the learner is at "
                f"{learner_version}: staleness {learner_version - b.version} > rollout.max_staleness="
                f"{max_staleness}. The samplers did not receive the latest adapter (or raise "
                f"rollout.max_staleness for asynchronous sampling).")
    return lag


def kill_actor_process(pool: RayWorkerPool, index: int, sig: int = signal.SIGKILL) -> int:
    """Kill actor `index`'s worker process (same machine only): fault-injection for tests and drills."""
    pid = pool.slots[index].pid
    os.kill(pid, sig)
    return pid
