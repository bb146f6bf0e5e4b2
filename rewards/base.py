"""The reward interface, the registry, and weighted mixtures.

A reward takes a rollout batch and returns one float per sample plus a validity mask. Invalid
samples (an unparseable judge verdict, a NaN, a crashed scorer) are *excluded* from the advantage
computation, never silently scored 0, and are counted in the metrics.
"""
from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..policies.batches import ImageRollout, RewardOutput, TextRollout
from ..policies.registry import Registry

_REGISTRY = Registry("reward type", name_attr="registry_name")
register_reward = _REGISTRY.register  # class decorator: `@register_reward("name")` -> `type: name` in configs


def reward_types() -> dict[str, type]:
    """Every registered reward type. The built-ins register when the `uniloop.rewards` package is
    imported, which Python does before any of its modules (this one included) can be used."""
    return dict(_REGISTRY)


class Reward:
    """Base class. Subclasses set `modalities` and implement `score`.

    `context` gives access to things a reward may need beyond the batch: `context.policy` is the
    policy being trained (for self-understanding rewards).
    """

    modalities: tuple[str, ...] = ("image", "text")
    registry_name = "reward"
    # Score in a background thread while the next chunk of the step samples (`async_scoring`): worth it
    # for rewards that wait on something else (an HTTP judge, a reward actor, a model on its own device).
    run_async: bool = False
    # Reads `context.policy`, the model being sampled and trained: such a reward must run in the main
    # thread between sampling calls (it may switch the adapter off), never in the background.
    uses_policy: bool = False

    def score(self, batch: ImageRollout | TextRollout, context: "RewardContext") -> RewardOutput:
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """Run-level counters of the reward itself (restarts of its actor...), logged as reward/<name>/<key>."""
        return {}

    def close(self):
        """Release resources (servers, actors). Called once at the end of a run."""


@dataclass
class RewardContext:
    policy: object = None  # the policy being trained (JanusPolicy), for self-judging rewards
    step: int = 0


@dataclass
class RewardSpec:
    name: str
    weight: float
    reward: Reward
    normalize: str = "none"  # none | group (z-score within the prompt's group) | running (mean/std so far)
    clip: tuple[float, float] | None = None  # clamp the (normalised) component to [lo, hi]
    run_async: bool | None = None  # None = the reward's own default (`Reward.run_async`)

    def __post_init__(self):
        if self.run_async is None:
            self.run_async = bool(getattr(self.reward, "run_async", False))
        if self.run_async and getattr(self.reward, "uses_policy", False):
            raise ValueError(f"reward {self.name!r} ({type(self.reward).__name__}) judges with the policy being "
                             f"trained, so it cannot be scored in the background: set async_scoring: false")


NORMALIZE_MODES = ("none", "group", "running")
COMBINE_MODES = ("sum_then_normalize", "normalize_then_sum")


def group_zscore(scores: torch.Tensor, valid: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6):
    """z-score of each valid score within its group (a group with < 2 valid samples or no spread -> 0)."""
    out = torch.zeros_like(scores)
    for g in group_ids.unique():
        m = (group_ids == g) & valid
        if m.sum() < 2:
            continue
        x = scores[m]
        std = x.std()
        if std > eps:
            out[m] = (x - x.mean()) / std
    return out


class RunningStats:
    """Mean/std of every valid score seen so far (Chan's parallel update): normalises a component
    whose scale is unknown up front (a judge's 1-10 next to a 0-1 rule) without per-group noise."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor):
        if len(x) == 0:
            return
        n_b, mean_b = len(x), float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta ** 2 * self.n * n_b / n
        self.n = n

    @property
    def std(self) -> float:
        return (self.m2 / (self.n - 1)) ** 0.5 if self.n > 1 else 1.0


@dataclass
class MixtureOutput:
    total: torch.Tensor  # (B,) weighted sum over the components that apply to the batch
    valid: torch.Tensor  # (B,) bool: every applicable component valid and the total finite
    components: dict[str, RewardOutput]
    errors: list[str] = field(default_factory=list)


class RewardMixture:
    """Weighted sum of named rewards. A component applies to the modalities it declares."""

    def __init__(self, specs: list[RewardSpec], combine: str = "sum_then_normalize"):
        """combine: `sum_then_normalize` adds the (optionally normalised/clipped) components with their
        weights and leaves normalisation to the advantage; `normalize_then_sum` z-scores each component
        within its group first (components without an explicit `normalize` get `group`), so a
        component's weight sets its share of the advantage whatever its scale."""
        if not specs:
            raise ValueError("at least one reward must be configured")
        if combine not in COMBINE_MODES:
            raise ValueError(f"reward combine mode must be one of {COMBINE_MODES}, got {combine!r}")
        for sp in specs:
            if sp.normalize not in NORMALIZE_MODES:
                raise ValueError(f"reward {sp.name!r}: normalize must be one of {NORMALIZE_MODES}, got {sp.normalize!r}")
            if sp.clip is not None and (len(sp.clip) != 2 or sp.clip[0] > sp.clip[1]):
                raise ValueError(f"reward {sp.name!r}: clip must be [low, high] with low <= high, got {sp.clip!r}")
        self.combine = combine
        self.running = {sp.name: RunningStats() for sp in specs}
        names = [s.name for s in specs]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"reward names must be unique, repeated: {sorted(dupes)}")
        self.specs = specs
        self._lanes: dict[str, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()
        self.busy_seconds: dict[str, float] = {}

    def applicable(self, kind: str) -> list[RewardSpec]:
        return [s for s in self.specs if kind in s.reward.modalities]

    def __call__(self, batch, context: RewardContext) -> MixtureOutput:
        """Score `batch` with every applicable component and combine them (synchronously)."""
        return self.mix(batch, self.submit(batch, context).result())

    @property
    def has_async(self) -> bool:
        return any(s.run_async for s in self.specs)

    def submit(self, batch, context: RewardContext) -> "PendingScores":
        """Start scoring `batch`: components with `run_async` go to background threads and return at
        once; the others are scored here and now. `.result()` gives the raw component outputs, which
        `mix` turns into the mixture (so chunks scored apart can be merged first; see
        `merge_components`)."""
        specs = self.applicable(batch.kind)
        if not specs:
            raise ValueError(f"no configured reward scores {batch.kind} rollouts "
                             f"(rewards: {[s.name for s in self.specs]})")
        pending = PendingScores(batch, context)
        for spec in specs:
            if spec.run_async:
                # one background lane per component: its chunks are scored in order, one at a time (a
                # reward need not be thread-safe); different components run side by side
                if spec.name not in self._lanes:
                    self._lanes[spec.name] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"reward-{spec.name}")
                lane = self._lanes[spec.name]
                pending.futures[spec.name] = (spec, lane.submit(self._timed_score, spec, batch, context))
            else:
                pending.futures[spec.name] = (spec, _done(self._timed_score, spec, batch, context))
        return pending

    def _timed_score(self, spec: RewardSpec, batch, context: RewardContext) -> RewardOutput:
        t0 = time.perf_counter()
        try:
            return spec.reward.score(batch, context)
        finally:
            with self._lock:
                self.busy_seconds[spec.name] = self.busy_seconds.get(spec.name, 0.0) + time.perf_counter() - t0

    def pop_busy_seconds(self) -> dict[str, float]:
        """Seconds each component spent scoring since the last call (async ones overlap sampling)."""
        with self._lock:
            out, self.busy_seconds = self.busy_seconds, {}
        return out

    def mix(self, batch, comps: dict[str, RewardOutput]) -> MixtureOutput:
        """The weighted (normalised, clipped) sum of raw component outputs over the whole batch."""
        B = len(batch)
        total = torch.zeros(B)
        valid = torch.ones(B, dtype=torch.bool)
        out_comps: dict[str, RewardOutput] = {}
        for spec in self.applicable(batch.kind):
            out = comps[spec.name]
            if out.scores.shape != (B,):
                raise RewardError(f"reward {spec.name!r} returned shape {tuple(out.scores.shape)}, expected ({B},)")
            v = out.valid & torch.isfinite(out.scores)
            out = RewardOutput(out.scores.float(), v, out.details)
            out_comps[spec.name] = out
            valid &= v
            total += self.weighted(spec, out, batch)
        return MixtureOutput(total=total, valid=valid, components=out_comps)

    def partial_total(self, batch, comps: dict[str, RewardOutput], names: list[str]) -> torch.Tensor:
        """The weighted sum of the named components only, each transformed as in `mix` (running
        statistics read, not updated: `mix` already counted this batch). Components that do not apply to
        the batch are skipped."""
        total = torch.zeros(len(batch))
        for spec in self.applicable(batch.kind):
            if spec.name in names:
                total += self.weighted(spec, comps[spec.name], batch, update=False)
        return total

    def weighted(self, spec: RewardSpec, out: RewardOutput, batch, update: bool = True) -> torch.Tensor:
        """weight x the transformed component, 0 where it is invalid."""
        return spec.weight * torch.where(out.valid, self.transform(spec, out, batch, update), torch.zeros(()))

    def transform(self, spec: RewardSpec, out: RewardOutput, batch, update: bool = True) -> torch.Tensor:
        """The component as it enters the weighted sum: normalised and clipped as configured."""
        x = out.scores
        mode = spec.normalize
        if mode == "none" and self.combine == "normalize_then_sum":
            mode = "group"
        if mode == "group":
            x = group_zscore(x, out.valid, batch.group_ids)
        elif mode == "running":
            stats = self.running[spec.name]
            if update:
                stats.update(x[out.valid])
            x = (x - stats.mean) / max(stats.std, 1e-6)
        if spec.clip is not None:
            x = x.clamp(spec.clip[0], spec.clip[1])
        return x

    def metrics(self) -> dict[str, float]:
        return {f"reward/{s.name}/{k}": float(v) for s in self.specs for k, v in s.reward.metrics().items()}

    def close(self):
        for lane in self._lanes.values():
            lane.shutdown(wait=True, cancel_futures=True)  # an aborted step: drop what is queued
        self._lanes = {}
        for s in self.specs:
            s.reward.close()


def build_mixture(reward_cfgs, combine: str = "sum_then_normalize") -> RewardMixture:
    """The mixture a run's `rewards:` list describes (each entry: name, type, weight, normalize, clip,
    async_scoring, args), every reward built from the registry with its `args`."""
    types = reward_types()
    specs = []
    for i, rc in enumerate(reward_cfgs):
        tname = rc.type or rc.name
        if tname not in types:
            raise ValueError(f"rewards[{i}] ({rc.name!r}): unknown reward type {tname!r}; "
                             f"registered: {sorted(types)}")
        try:
            reward = types[tname](**dict(rc.args))
        except TypeError as e:
            raise ValueError(f"rewards[{i}] ({rc.name!r}): bad args for {tname}: {e}") from None
        specs.append(RewardSpec(rc.name, rc.weight, reward, normalize=rc.normalize,
                                clip=tuple(rc.clip) if rc.clip is not None else None,
                                run_async=rc.async_scoring))
    return RewardMixture(specs, combine=combine)


def _done(fn, *args) -> Future:
    """Run `fn` now; its result (or exception) in an already-completed Future."""
    f: Future = Future()
    try:
        f.set_result(fn(*args))
    except Exception as e:  # noqa: BLE001 - re-raised by PendingScores.result with the reward named
        f.set_exception(e)
    return f


class PendingScores:
    """The component scores of one batch, some possibly still being computed in the background."""

    def __init__(self, batch, context: RewardContext):
        self.batch, self.context = batch, context
        self.futures: dict[str, tuple[RewardSpec, Future]] = {}

    def result(self) -> dict[str, RewardOutput]:
        """Wait for every component; a reward that raised is named together with the failing sample."""
        out = {}
        for name, (spec, fut) in self.futures.items():
            try:
                out[name] = fut.result()
            except Exception as e:  # noqa: BLE001
                raise RewardError(describe_failure(spec, self.batch, self.context, e)) from e
        return out


def merge_components(parts: list[dict[str, RewardOutput]]) -> dict[str, RewardOutput]:
    """Concatenate the component outputs of consecutive chunks of one batch, in chunk order."""
    if len(parts) == 1:
        return parts[0]
    merged = {}
    for name in parts[0]:
        outs = [p[name] for p in parts]
        details = {}
        for key in outs[0].details:
            if all(key in o.details and isinstance(o.details[key], list) for o in outs):
                details[key] = [x for o in outs for x in o.details[key]]
        merged[name] = RewardOutput(torch.cat([o.scores.float() for o in outs]), torch.cat([o.valid for o in outs]),
                                    details)
    return merged


class RewardError(RuntimeError):
    """A reward raised: the message names the reward and the sample."""


MAX_ISOLATE = 256  # largest batch re-scored sample by sample to find the one that fails


def describe_failure(spec: RewardSpec, batch, context: RewardContext, err: Exception) -> str:
    """Name the reward and the failing sample: re-score the samples one at a time (only on this
    failure path, which ends the run anyway) and report the first that raises on its own."""
    head = f"reward {spec.name!r} ({type(spec.reward).__name__})"
    B, bad = len(batch), None
    if B == 1:
        bad = 0
    elif B <= MAX_ISOLATE:
        for i in range(B):
            try:
                spec.reward.score(batch.select([i]), context)
            except Exception:
                bad = i
                break
    if bad is not None:
        where = f"on {batch.kind} sample {bad} of {B} (prompt {batch.prompts[bad]!r})"
    else:
        where = (f"on a batch of {B} {batch.kind} samples (no single sample fails alone; first prompt "
                 f"{batch.prompts[0]!r})")
    return f"{head} failed {where}: {type(err).__name__}: {err}"


def finite_or_nan(x: float) -> float:
    return x if math.isfinite(x) else float("nan")


RewardFn = Callable[[ImageRollout | TextRollout, RewardContext], RewardOutput]
