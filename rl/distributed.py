"""Learner ranks on Ray: N data-parallel copies of the learner joined by a torch.distributed group.

    driver (the Trainer as with 1 rank)          rank r (a Ray actor in bundle r of one placement group)
      sample + score + advantages (whole groups)   its own policy (same spec, seed and adapter tensors)
      ray.put(scored) once  ------------------->   every optimizer step: its slice of each micro-batch,
                                                   normalisers from the whole step (global counts),
                                                   gradients all-reduced (DDP) or reduce-scattered (FSDP2)
      load the updated trainable tensors  <-----   rank 0 returns them; metrics from every rank

The placement follows verl / OpenRLHF: rank 0 sits on bundle 0 and picks MASTER_ADDR (its node's IP)
and a free port; every rank sets MASTER_*, WORLD_SIZE, RANK, LOCAL_RANK and calls
`init_process_group` (gloo on CPU, NCCL on GPU). Every rank reads the same scored batch, so its
loss normalisers are the one-rank ones exactly, and the sum of the ranks' gradients is the one-rank
gradient: DDP and FSDP2 average over ranks, so each rank's loss is scaled by the world size.
Checkpoints: the ranks write their model and optimizer state with torch.distributed.checkpoint
(DCP) into the checkpoint directory, which reloads on any number of ranks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
import warnings

import torch

from ..policies.registry import PolicySpec, resolve_checkpoint
from ..rollouts.weight_sync import bucket_bytes, iter_trainable, nbytes, tensor_buckets

LEARNER_DIR = "learner"  # inside a checkpoint: the ranks' DCP files


def _dcp_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # the trained tensors, not the frozen base; loading is not strict about the frozen tensors left out
    # (dcp.load itself fails on a trained tensor the checkpoint lacks)
    return StateDictOptions(ignore_frozen_params=True, strict=False)


# ----------------------------------------------------------------------------- tensors
def trainable_state(policy, keep: bool = True) -> dict[str, torch.Tensor]:
    """The trainable tensors by name, full, on CPU. An FSDP2 shard is gathered one parameter at a time
    (`DTensor.full_tensor`, a collective every rank joins; `keep=False` drops it at once), so no device
    ever holds a second full copy of the model."""
    return dict(iter_trainable(policy, keep))


@torch.no_grad()
def load_trainable_state(policy, state: dict[str, torch.Tensor], partial: bool = False):
    """Copy `state` (from `trainable_state`; `partial`: a bucket of it) into the policy's trainable
    parameters, in place."""
    params = {n: p for n, p in policy.model.named_parameters() if p.requires_grad}
    missing = sorted(set(state) - set(params) if partial else set(params) ^ set(state))
    if missing:
        raise ValueError(f"trainable tensors do not match the policy: {missing[:3]}")
    for name in state:
        p = params[name]
        value = state[name].to(p.device, p.dtype)
        if hasattr(p, "redistribute"):  # a DTensor shard: keep this rank's part of the full tensor
            from torch.distributed.tensor import distribute_tensor
            value = distribute_tensor(value, p.device_mesh, p.placements).to_local()
            p.to_local().copy_(value)
        else:
            p.copy_(value)


# ----------------------------------------------------------------------------- the process group
class RankContext:
    """What a trainer on one rank needs to know: its rank, the world, and how gradients are reduced."""

    def __init__(self, rank: int, world: int, strategy: str = "ddp"):
        self.rank, self.world, self.strategy = rank, world, strategy
        self.ddp = None

    def wrap(self, policy, learner_cfg):
        """DDP around the policy's model (gradients all-reduced in backward), or FSDP2 `fully_shard` on
        each decoder layer of the language model (where the adapters or the trained weights live)."""
        if self.strategy == "fsdp":
            shard_policy(policy, learner_cfg)
            return
        from torch.nn.parallel import DistributedDataParallel
        # The policies call their sub-modules directly, not one forward: DDP runs a closure that
        # computes the whole micro-batch loss, so its reducer sees every forward and backward.
        # find_unused_parameters: a text micro-batch leaves the image-only adapters without gradient
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            self.ddp = DistributedDataParallel(_Closure(policy.model), find_unused_parameters=True,
                                               broadcast_buffers=False)

    def loss(self, compute):
        """`compute()` (a scalar loss) through DDP when there is one; FSDP2 hooks into the modules."""
        return self.ddp(compute) if self.ddp is not None else compute()

    def no_sync(self, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an optimizer step."""
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def rows(self, idx: list[int]) -> tuple[list[int], float]:
        """This rank's contiguous slice of a micro-batch's rows, and the weight of its loss. A rank left
        without rows runs the first row with weight 0: every rank joins every gradient reduction."""
        n = len(idx)
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        return (idx[lo:hi], 1.0) if hi > lo else (idx[:1], 0.0)


class _Closure(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, compute):
        return compute()


def shard_policy(policy, learner_cfg):
    """FSDP2: every decoder layer of the language model is its own `fully_shard` unit (its forward is
    what the policy calls); mixed precision and CPU offload as `learner` says."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if learner_cfg.mixed_precision != "no":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[learner_cfg.mixed_precision]
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    if learner_cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    layers = decoder_layers(policy)
    for layer in layers:
        fully_shard(layer, **kwargs)
    outside = [n for n, p in policy.model.named_parameters() if p.requires_grad
               and not any(p is q for layer in layers for q in layer.parameters())]
    if outside:
        raise ValueError(f"strategy fsdp shards the language model's decoder layers; trainable tensors outside "
                         f"them would not be reduced: {outside[:3]}")


def decoder_layers(policy) -> list[torch.nn.Module]:
    lm = policy.language_model
    for path in ("layers", "model.layers", "decoder.layers"):
        mod = lm
        try:
            for part in path.split("."):
                mod = getattr(mod, part)
        except AttributeError:
            continue
        return list(mod)
    raise ValueError(f"strategy fsdp: no decoder layers found in {type(lm).__name__}")


def train_decoder_weights(policy):
    """learner.full_finetune: every weight of the language model's decoder layers is trained."""
    for layer in decoder_layers(policy):
        layer.requires_grad_(True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world: int, addr: str, port: int, gpu: bool):
    """As verl / OpenRLHF: the rendezvous in env vars, then one group (NCCL with GPUs, gloo on CPU)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK="0")  # Ray gives each GPU rank its own CUDA_VISIBLE_DEVICES
    dist.init_process_group("cpu:gloo,cuda:nccl" if gpu else "gloo", rank=rank, world_size=world)


# ----------------------------------------------------------------------------- one rank (a Ray actor)
class LearnerRank:
    """Body of the Ray actor of one rank: a learner-only trainer (`Trainer.for_rank`)."""

    def __init__(self, rank: int, num_threads: int):
        from ..rollouts.ray_pool import _quiet_hf
        _quiet_hf()
        torch.set_num_threads(max(1, num_threads))
        self.rank, self.trainer = rank, None

    def info(self) -> dict:
        import ray
        return {"rank": self.rank, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "ip": ray.util.get_node_ip_address()}

    def rendezvous(self) -> tuple[str, int]:
        return self.info()["ip"], free_port()

    def setup(self, trainer_cls, cfg, spec: PolicySpec, world: int, addr: str, port: int, state: dict):
        gpu = cfg.learner.num_gpus_per_worker > 0
        init_process_group(self.rank, world, addr, port, gpu)
        ctx = RankContext(self.rank, world, cfg.learner.strategy)
        self.trainer = trainer_cls.for_rank(cfg, spec, ctx)
        self.load(state)
        return self.info()

    def load(self, state: dict):
        """The driver's trainable tensors, adapter version and (when it has one) optimizer state."""
        t = self.trainer
        load_trainable_state(t.policy, state["weights"])
        t.policy.version = state["version"]
        if state.get("optimizer") is not None:
            t.optimizer.load_state_dict(state["optimizer"])
        self.load_extra(state.get("extra") or {})

    def load_extra(self, extra: dict):
        """The algorithm's update state (`Trainer.extra_state`: an EMA of the adapter) from the driver."""
        if extra:
            self.trainer.load_extra_state(extra)

    def update(self, box: list, version: int, step: int, weights: bool = True) -> dict:
        """One update; rank 0 returns the trainable tensors (`weights`; else `weight_buckets` streams them)."""
        import ray
        scored = ray.get(box[0])
        t = self.trainer
        t.policy.version, t.step = version, step  # the driver's step (seeds of per-step draws)
        t0 = time.perf_counter()
        metrics = t.update(scored)
        out = {"metrics": metrics, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}
        if self.rank == 0:
            out["extra"] = t.extra_state()  # e.g. the EMA the driver samples / evaluates with
        if weights:
            state = trainable_state(t.policy, keep=self.rank == 0)  # FSDP2: every rank joins the gathers
            if self.rank == 0:
                out["weights"] = state
        return out

    def weight_buckets(self, limit: int):
        """Full weights (a Ray streaming generator): every rank runs the gathers in the same order, rank 0
        yields them in buckets of at most `limit` bytes, as they fill."""
        yield from tensor_buckets(iter_trainable(self.trainer.policy, keep=self.rank == 0), limit)

    def optimizer_state(self) -> dict:
        return self.trainer.optimizer.state_dict()

    # learner.mode colocated: this rank also samples (the ColocatedPool's "actor" interface)
    def set_sampling(self, sampling, seed: int) -> dict:
        from ..rollouts.worker import RolloutWorker
        self.sampler = RolloutWorker(self.trainer.policy, sampling, seed, shares_learner_policy=True)
        return self.info()

    def set_version(self, version: int):
        self.trainer.policy.version = version

    def generate(self, request, box: list, version: int):
        """Sample `request` with the weights this rank trains (equal on every DDP rank and to the
        driver's copy: it loads rank 0's tensors after each update)."""
        if self.trainer.policy.version != version:
            raise RuntimeError(f"learner rank {self.rank} is at version {self.trainer.policy.version}, the step "
                               f"samples with version {version}")
        t0 = time.perf_counter()
        with self.trainer.sampling_weights():  # an algorithm may sample with other weights (an EMA)
            batch = self.sampler.generate(request)
        return batch, {**self.info(), "version": version, "seconds": time.perf_counter() - t0}

    def save(self, path: str):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model, optim = get_state_dict(self.trainer.policy.model, self.trainer.optimizer, options=_dcp_options())
        dcp.save({"model": model, "optim": optim}, checkpoint_id=path)

    def restore(self, path: str, version: int):
        dcp_restore(self.trainer.policy.model, self.trainer.optimizer, path)
        self.trainer.policy.version = version


def dcp_restore(model, optimizer, path):
    """Load the ranks' DCP files (trained tensors + optimizer state) into `model` / `optimizer`: on any
    number of ranks (DCP reshards), or in one process without a process group (the in-process learner
    resuming a run that had ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_dcp_options())
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_dcp_options())


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- the driver's handle
class LearnerGroup:
    """`learner.num_workers` ranks in one placement group; `update(scored)` replaces the in-process update."""

    def __init__(self, trainer):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from ..rewards.actors import init_ray

        lc, cfg = trainer.cfg.learner, trainer.cfg
        self.world, self.started_ray = lc.num_workers, init_ray(cfg.ray)
        bundle = {"CPU": lc.num_cpus_per_worker, **({"GPU": lc.num_gpus_per_worker} if lc.num_gpus_per_worker else {})}
        self.pg = placement_group([dict(bundle) for _ in range(self.world)], strategy=lc.placement_strategy)
        try:
            ray.get(self.pg.ready(), timeout=lc.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(self.pg)
            raise RuntimeError(f"the learner's placement group ({self.world} x {bundle}, {lc.placement_strategy}) did "
                               f"not fit the Ray cluster within {lc.start_timeout_s} s: {ray.cluster_resources()} "
                               f"(learner.num_workers / num_cpus_per_worker / num_gpus_per_worker)") from None
        device = "cuda" if lc.num_gpus_per_worker > 0 else "cpu"
        spec = dataclasses.replace(resolve_checkpoint(trainer.spec), load={**trainer.spec.load, "device": device})
        actor = ray.remote(LearnerRank)
        threads = max(1, int(lc.num_cpus_per_worker))
        self.ranks = [actor.options(num_cpus=lc.num_cpus_per_worker, num_gpus=lc.num_gpus_per_worker, max_restarts=0,
                                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                                        self.pg, placement_group_bundle_index=r)).remote(r, threads)
                      for r in range(self.world)]
        addr, port = ray.get(self.ranks[0].rendezvous.remote(), timeout=lc.start_timeout_s)
        state = self.driver_state(trainer)
        self.info = ray.get([h.setup.remote(type(trainer), cfg, spec, self.world, addr, port, state)
                             for h in self.ranks], timeout=lc.start_timeout_s)
        # where each rank runs (node, pid): for the operator, and for the tests that kill one
        (trainer.run_dir / "learner.json").write_text(json.dumps({"strategy": lc.strategy, "ranks": self.info}))
        self.last = {}

    @staticmethod
    def driver_state(trainer, optimizer: bool = False) -> dict:
        return {"weights": trainable_state(trainer.policy), "version": trainer.policy.version,
                "optimizer": trainer.optimizer.state_dict() if optimizer else None, "extra": trainer.extra_state()}

    def _get(self, futures):
        import ray
        try:
            return ray.get(futures)
        except ray.exceptions.RayActorError as e:
            raise self.died(e) from e

    def died(self, e: BaseException) -> RuntimeError:
        return RuntimeError(f"a learner rank died ({e.__class__.__name__}); the ranks were "
                            f"{[(i['rank'], i['pid'], i['node_id'][:8]) for i in self.info]}. Restart the run "
                            f"with --resume: it continues from the last checkpoint on any number of ranks")

    def update(self, trainer, scored) -> dict:
        """One update on every rank; the driver's policy gets rank 0's trainable tensors."""
        import ray
        box, stream = [ray.put(scored)], trainer.cfg.learner.full_finetune
        outs = self._get([h.update.remote(box, trainer.policy.version, trainer.step, not stream)
                          for h in self.ranks])
        t0 = time.perf_counter()
        if stream:
            moved = self.pull_buckets(trainer)
        else:
            load_trainable_state(trainer.policy, outs[0]["weights"])
            moved = {"learner/weights_bytes": float(nbytes(outs[0]["weights"]))}
        if outs[0].get("extra"):
            trainer.load_extra_state(outs[0]["extra"])
        self.last = {**moved, "learner/weights_load_seconds": time.perf_counter() - t0,
                     "learner/rank_seconds_max": max(o["seconds"] for o in outs),
                     "learner/peak_rss_mb_max": max(o["peak_rss_mb"] for o in outs)}
        return {**trainer.combine_rank_metrics([o["metrics"] for o in outs]), **self.last}

    def pull_buckets(self, trainer) -> dict:
        """Full weights from rank 0 into the driver's policy bucket by bucket (rollouts/weight_sync.py): Ray
        keeps rank 0 at most two buckets ahead, so no process holds a second full copy."""
        import ray
        limit = bucket_bytes(trainer.cfg.rollout.weight_bucket_mb)
        streams = [h.weight_buckets.options(num_returns="streaming", _generator_backpressure_num_objects=2)
                   .remote(limit) for h in self.ranks]
        names, size, count, biggest = set(), 0, 0, 0
        try:
            for ref in streams[0]:
                bucket = ray.get(ref)
                load_trainable_state(trainer.policy, bucket, partial=True)
                names.update(bucket)
                n = nbytes(bucket)
                size, count, biggest = size + n, count + 1, max(biggest, n)
                del bucket, ref
            for rest in streams[1:]:  # the other ranks yield nothing; this waits for their gathers
                for ref in rest:
                    ray.get(ref)
        except ray.exceptions.RayActorError as e:
            raise self.died(e) from e
        want = {n for n, p in trainer.policy.model.named_parameters() if p.requires_grad}
        if names != want:
            raise RuntimeError(f"the learner ranks sent {len(names)} of {len(want)} trained tensors")
        return {"learner/weights_bytes": float(size), "learner/weight_buckets": float(count),
                "learner/max_bucket_bytes": float(biggest)}

    def pull_optimizer(self, trainer):
        """DDP: every rank holds the whole optimizer state; the driver's copy makes its checkpoint
        resumable in-process (learner.num_workers: 1) too."""
        if trainer.cfg.learner.strategy == "ddp":
            trainer.optimizer.load_state_dict(self._get(self.ranks[0].optimizer_state.remote()))

    def save(self, path):
        self._get([h.save.remote(str(path)) for h in self.ranks])

    def restore(self, trainer, ckpt):
        """From a checkpoint's DCP files when it has them (any rank count), else the driver's state."""
        path = ckpt / LEARNER_DIR
        if path.exists():
            self._get([h.restore.remote(str(path.absolute()), trainer.policy.version) for h in self.ranks])
            self._get([h.load_extra.remote(trainer.extra_state()) for h in self.ranks])
        else:
            state = self.driver_state(trainer, optimizer=trainer.cfg.learner.strategy == "ddp")
            self._get([h.load.remote(state) for h in self.ranks])

    def rollout_pool(self, sampling, rollout_cfg, seed: int):
        """learner.mode colocated: the ranks as the step's samplers."""
        from .colocated import ColocatedPool  # imports Ray's pool: only runs with ranks get here
        return ColocatedPool(self, sampling, rollout_cfg, seed)

    def close(self):
        import ray
        for h in self.ranks:
            ray.kill(h)
        ray.util.remove_placement_group(self.pg)


def combine_metrics(per_rank: list[dict]) -> dict:
    """The ranks' update metrics as one: losses are each rank's share of the global loss (summed),
    maxima stay maxima, the rest (clip fraction, KL, grad norm: equal on every rank) are averaged."""
    out = {}
    for key in per_rank[0]:
        vals = [m[key] for m in per_rank]
        if key == "loss" or key.endswith("/loss_sum"):
            out[key] = float(sum(vals))
        elif "max" in key:
            out[key] = float(max(vals))
        else:
            out[key] = float(sum(vals) / len(vals))
    return out

