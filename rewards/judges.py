"""UnifiedReward-style VLM judges: one reward, four modes, two backends behind one interface.

Modes (see rewards/parsing.py for the verdict formats and the exact parsing rules):

- `generation_pointwise`: image + prompt -> `Final Score: X` (default range 1-5);
- `generation_pairwise`: two images of one prompt -> `Image 1 is better` / `Image 2 is better`;
- `understanding_pointwise`: image + question + answer -> `Final Score: X` (default range 0-100);
- `understanding_pairwise`: image + question + two answers -> `Answer 1 is better` / `Answer 2 ...`.

`cot: true` selects the chain-of-thought variant (verdict inside `<answer>...</answer>`).

Pairwise judges turn comparisons into one reward per sample: each sample is compared with others
of its GRPO group and scores its win rate (a tie counts half); comparisons whose verdict is
unparseable are dropped, and a sample left with no valid comparison is invalid.

Backends (`backend:`):

- `local`: any transformers image-text-to-text model (`AutoModelForImageTextToText`), by hub id
  or local path, batched, on a device of its own (`device: cuda:1`); `model: tiny` builds a tiny
  real Qwen2.5-VL judge offline (rewards/tiny_judge.py);
- `remote`: an OpenAI-compatible `/v1/chat/completions` endpoint (vLLM, SGLang, or
  `uniloop serve-judge`), images as base64 PNG data URLs, with a concurrency limit, a timeout,
  retries with exponential backoff, and an API key read from the environment variable named by
  `api_key_env` (never logged, never stored in the config).

A verdict that cannot be parsed, is out of range, comes from a truncated generation, or never
arrives (timeouts and HTTP errors after the last retry) makes the sample invalid: excluded from the
advantages, counted in `reward/<name>/invalid`, never a silent 0.
"""
from __future__ import annotations

import itertools

import torch

from .base import Reward, RewardContext, RewardOutput, register_reward
from .judge_backends import (DEFAULT_RANGES, REQUIRED_FIELDS, JudgeBackend, JudgeReply, JudgeRequest,
                             LocalJudgeBackend, OpenAIJudgeBackend, TransformersVLM, default_template, fill_template)
from .parsing import (DEFAULT_TIE_PATTERN, MODES, PAIRWISE_MODES, POINTWISE_MODES, parse_dimension_scores,
                      parse_pairwise_dimension_scores, parse_verdict)
from .tiny_judge import build_tiny_vlm_judge, default_tiny_judge_dir


# ----------------------------------------------------------------------------- the reward
def group_pairs(group_ids: torch.Tensor, pairing: str = "all") -> list[tuple[int, int]]:
    """Pairs (i, j), i < j in batch order, compared within each GRPO group.

    `all`: every pair (n(n-1)/2 per group); `ring`: each sample with the next one (n per group,
    every sample in two comparisons): cheaper for big groups.
    """
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids.tolist()):
        groups.setdefault(g, []).append(i)
    pairs = []
    for members in groups.values():
        if len(members) < 2:
            continue
        if pairing == "all":
            pairs += list(itertools.combinations(members, 2))
        elif pairing == "ring":
            n = len(members)
            ring = {tuple(sorted((members[k], members[(k + 1) % n]))) for k in range(n)}
            pairs += sorted(ring)
        else:
            raise ValueError(f"pairing must be 'all' or 'ring', got {pairing!r}")
    return pairs


@register_reward("judge")
class VLMJudge(Reward):
    """A VLM judge in one of four modes (see the module docstring); config keys are the arguments.

    mode, cot, template, score_range, normalize (`unit`: (x - low) / (high - low); `none`: raw),
    integer, allow_tie, tie_pattern, labels, several (`reject`|`last`), pairing (`all`|`ring`),
    both_orders (judge each pair in both orders and average: cancels position bias),
    verdict (`classic`: Final Score / "Image N is better"; `unifiedreward2`: UnifiedReward-2.0's per-dimension
    scores), dimension (with unifiedreward2: `mean`, `final`, or a dimension name such as `alignment`),
    backend (`local`|`remote`), model, max_new_tokens, temperature,
    local: device, dtype, batch_size, attn_implementation, cache_dir + tiny (for `model: tiny`),
    remote: base_url, api_key_env, concurrency, timeout, max_retries, backoff, max_backoff, extra_body.
    """

    run_async = True  # waits on a server or a model of its own: overlap it with sampling

    def __init__(self, mode: str = "generation_pointwise", backend: str = "local", model: str = "tiny",
                 template: str | None = None, cot: bool = False, score_range: list[float] | None = None,
                 normalize: str = "unit", integer: bool = False, allow_tie: bool = False,
                 tie_pattern: str = DEFAULT_TIE_PATTERN, labels: list[str] | None = None, several: str = "reject",
                 pairing: str = "all", both_orders: bool = False, max_new_tokens: int = 256,
                 temperature: float = 0.0, verdict: str = "classic", dimension: str = "mean",
                 device: str = "cpu", dtype: str = "float32", batch_size: int = 8,
                 attn_implementation: str | None = None, cache_dir: str | None = None, tiny: dict | None = None,
                 base_url: str | None = None, api_key_env: str | None = None, concurrency: int = 8,
                 timeout: float = 60.0, max_retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0,
                 extra_body: dict | None = None):
        if mode not in MODES:
            raise ValueError(f"judge mode must be one of {list(MODES)}, got {mode!r}")
        if normalize not in ("unit", "none"):
            raise ValueError(f"judge normalize must be 'unit' or 'none', got {normalize!r}")
        if several not in ("reject", "last"):
            raise ValueError(f"judge several must be 'reject' or 'last', got {several!r}")
        group_pairs(torch.zeros(0), pairing)  # validates `pairing`
        self.mode, self.cot, self.normalize, self.integer = mode, cot, normalize, integer
        self.template = template if template is not None else default_template(mode, cot)
        missing = [f for f in REQUIRED_FIELDS[mode] if "{" + f + "}" not in self.template]
        if missing:
            raise ValueError(f"judge template for {mode} must contain {', '.join('{' + f + '}' for f in missing)}")
        rng = score_range if score_range is not None else DEFAULT_RANGES.get(mode, (0.0, 1.0))
        if len(rng) != 2 or not float(rng[0]) < float(rng[1]):
            raise ValueError(f"judge score_range must be [low, high] with low < high, got {rng!r}")
        self.low, self.high = float(rng[0]), float(rng[1])
        self.labels = tuple(str(x) for x in (labels or ("1", "2")))
        self.allow_tie, self.tie_pattern, self.several = allow_tie, tie_pattern, several
        self.pairing, self.both_orders = pairing, both_orders
        if verdict not in ("classic", "unifiedreward2"):
            raise ValueError(f"judge verdict must be 'classic' or 'unifiedreward2', got {verdict!r}")
        if verdict == "unifiedreward2" and not mode.startswith("generation"):
            raise ValueError("judge verdict 'unifiedreward2' reads image verdicts: use a generation_* mode")
        self.verdict, self.dimension = verdict, dimension
        self.modalities = ("image",) if mode.startswith("generation") else ("text",)
        if backend == "local":
            path = model
            if model == "tiny":
                path = build_tiny_vlm_judge(cache_dir or default_tiny_judge_dir(), **(tiny or {}))
            self.backend: JudgeBackend = LocalJudgeBackend(
                TransformersVLM(path, device=device, dtype=dtype, attn_implementation=attn_implementation,
                                batch_size=batch_size), max_new_tokens, temperature)
        elif backend == "remote":
            if not base_url:
                raise ValueError("judge backend 'remote' needs base_url (e.g. http://127.0.0.1:8000/v1)")
            self.backend = OpenAIJudgeBackend(base_url, model, api_key_env=api_key_env, concurrency=concurrency,
                                              timeout=timeout, max_retries=max_retries, backoff=backoff,
                                              max_backoff=max_backoff, max_tokens=max_new_tokens,
                                              temperature=temperature, extra_body=extra_body)
        else:
            raise ValueError(f"judge backend must be 'local' or 'remote', got {backend!r}")

    # -- pieces other rewards reuse (cycle consistency)
    def parse(self, reply: JudgeReply):
        if reply.error is not None:
            return None, reply.error
        if self.verdict == "unifiedreward2":
            return self.parse_dimensions(reply)
        v = parse_verdict(reply.text, self.mode, score_range=(self.low, self.high), cot=self.cot,
                          finished=reply.finished, allow_tie=self.allow_tie, labels=self.labels,
                          integer=self.integer, several=self.several, tie_pattern=self.tie_pattern)
        if not v.ok:
            return None, v.error
        if self.mode in POINTWISE_MODES and self.normalize == "unit":
            return (v.value - self.low) / (self.high - self.low), None
        return v.value, None

    def parse_dimensions(self, reply: JudgeReply):
        """UnifiedReward-2.0's multi-dimension verdicts, reduced to one number by `dimension` (`mean` of the
        dimensions, `final`, or one dimension's name); pairwise: image 1's share of the comparison."""
        if self.mode in PAIRWISE_MODES:
            v = parse_pairwise_dimension_scores(reply.text, None, cot=self.cot, finished=reply.finished)
        else:
            v = parse_dimension_scores(reply.text, self.low, self.high, None, cot=self.cot, finished=reply.finished)
        if not v.ok:
            return None, v.error
        try:
            value = v.value(self.dimension)
        except ValueError as e:
            return None, str(e)
        if value is None:
            return None, f"no {self.dimension!r} score in the verdict"
        if self.mode in POINTWISE_MODES and self.normalize == "unit":
            return (value - self.low) / (self.high - self.low), None
        return value, None

    def score_pointwise(self, images, fields: list[dict]) -> RewardOutput:
        """One request per sample: image i with template fields[i]."""
        reqs = [JudgeRequest(fill_template(self.template, [images[i]], low=f"{self.low:g}", high=f"{self.high:g}", **f))
                for i, f in enumerate(fields)]
        replies = self.backend.generate(reqs)
        scores = torch.full((len(reqs),), float("nan"))
        errors = []
        for i, rep in enumerate(replies):
            value, err = self.parse(rep)
            if value is not None:
                scores[i] = value
            errors.append(err or "")
        return RewardOutput(scores, torch.isfinite(scores),
                            {"judge_text": [r.text for r in replies], "judge_error": errors})

    def score_pairwise(self, batch) -> RewardOutput:
        B = len(batch)
        pairs = group_pairs(batch.group_ids, self.pairing)
        ordered = pairs + ([(j, i) for i, j in pairs] if self.both_orders else [])
        reqs = []
        for i, j in ordered:
            if self.mode == "generation_pairwise":
                reqs.append(JudgeRequest(fill_template(self.template, [batch.images[i], batch.images[j]],
                                                       prompt=batch.prompts[i])))
            else:
                reqs.append(JudgeRequest(fill_template(self.template, [batch.images[i]], question=batch.prompts[i],
                                                       answer1=batch.answers[i], answer2=batch.answers[j])))
        replies = self.backend.generate(reqs) if reqs else []
        wins, counts = torch.zeros(B), torch.zeros(B)
        texts, errors = [None] * B, [""] * B
        bad = [0] * B
        for (i, j), rep in zip(ordered, replies):
            value, err = self.parse(rep)
            for k in (i, j):
                if texts[k] is None:
                    texts[k] = rep.text
            if value is None:
                bad[i] += 1
                bad[j] += 1
                errors[i] = errors[j] = err
                continue
            wins[i] += value
            wins[j] += 1 - value
            counts[i] += 1
            counts[j] += 1
        scores = torch.where(counts > 0, wins / counts.clamp(min=1), torch.full((B,), float("nan")))
        for k in range(B):
            if counts[k] == 0 and not errors[k]:
                errors[k] = "no other sample in its group to compare with"
        return RewardOutput(scores, counts > 0, {"judge_text": texts, "judge_error": errors,
                                                 "invalid_comparisons": bad})

    def score(self, batch, context: RewardContext) -> RewardOutput:
        if batch.kind not in self.modalities:
            raise ValueError(f"judge mode {self.mode} scores {self.modalities[0]} rollouts, got {batch.kind}")
        if self.mode in PAIRWISE_MODES:
            return self.score_pairwise(batch)
        if self.mode == "generation_pointwise":
            return self.score_pointwise(batch.images, [{"prompt": p} for p in batch.prompts])
        return self.score_pointwise(batch.images, [{"question": q, "answer": a}
                                                   for q, a in zip(batch.prompts, batch.answers)])

    def close(self):
        self.backend.close()
