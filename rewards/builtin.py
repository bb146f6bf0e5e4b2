"""Built-in rewards for the synthetic tasks and plain text answers.

Heavier rewards live in their own modules (clip.py, judges.py, self_understanding.py, ...); the
package's __init__ imports them all, so every built-in is registered once `uniloop.rewards` is.
"""
from __future__ import annotations

import re
import string

import torch

from ..policies.tiny import COLORS
from .base import Reward, RewardContext, RewardOutput, register_reward


def named_color(text: str) -> str | None:
    """The first color word of `text` (the synthetic task's target), or None."""
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in COLORS:
            return word
    return None


@register_reward("color")
class ColorReward(Reward):
    """How close the image's pixels are to the color named in the prompt (or in `targets`).

    Default (`contrast_temperature: null`): score = 1 - mean_pixels ||pixel - target|| / sqrt(3), in
    [0, 1]. This gives partial credit to a wrong color that lies between targets: yellow scores 0.42
    for both "red" and "green", so a policy that tells prompts apart poorly earns most reward by
    drawing yellow for both (the quickstart's collapse, see README).

    `contrast_temperature: t`: score = mean over pixels of softmax_c(-||pixel - c|| / t) at the
    target, c over all the reward's colors: the probability that the pixel shows the target rather
    than another named color. A compromise color then scores about 0 for every prompt, so only
    drawing each prompt's own color pays. A prompt naming no known color is invalid (excluded), not 0.
    """

    modalities = ("image",)

    @staticmethod
    def check_args(colors=None, contrast_temperature=None):
        """Config-time value checks (rl/validate.py calls them before any model loads)."""
        if contrast_temperature is not None and not (isinstance(contrast_temperature, (int, float))
                                                     and contrast_temperature > 0):
            raise ValueError(f"contrast_temperature must be > 0 or null, got {contrast_temperature!r}")

    def __init__(self, colors: dict[str, list[float]] | None = None, contrast_temperature: float | None = None):
        self.check_args(colors, contrast_temperature)
        self.colors = {k: tuple(v) for k, v in (colors or COLORS).items()}
        self.contrast_temperature = contrast_temperature
        self._names = list(self.colors)
        self._table = torch.tensor([self.colors[n] for n in self._names], dtype=torch.float32)

    def score(self, batch, context: RewardContext) -> RewardOutput:
        scores = torch.full((len(batch),), float("nan"))
        for i, prompt in enumerate(batch.prompts):
            name = batch.targets[i] if batch.targets and batch.targets[i] else named_color(prompt)
            if name not in self.colors:
                continue
            pixels = batch.images[i].float().reshape(-1, 3)
            if self.contrast_temperature is None:
                target = torch.tensor(self.colors[name], dtype=torch.float32)
                scores[i] = 1 - (pixels - target).norm(dim=-1).mean() / 3 ** 0.5
            else:
                dist = torch.cdist(pixels, self._table)  # (pixels, colors)
                prob = torch.softmax(-dist / self.contrast_temperature, dim=-1)
                scores[i] = prob[:, self._names.index(name)].mean()
        return RewardOutput.from_scores(scores)


@register_reward("color_accuracy")
class ColorAccuracyReward(ColorReward):
    """1 if the image's mean color is nearest (among `colors`) to the color the prompt names, else 0:
    a verifiable "did it draw the right color" rate, e.g. as an evaluation metric at `weight: 0`.
    `details["nearest_color"]` holds each image's nearest color name."""

    def score(self, batch, context: RewardContext) -> RewardOutput:
        scores = torch.full((len(batch),), float("nan"))
        nearest = []
        for i, prompt in enumerate(batch.prompts):
            mean = batch.images[i].float().reshape(-1, 3).mean(0)
            nearest.append(self._names[int((self._table - mean).norm(dim=-1).argmin())])
            name = batch.targets[i] if batch.targets and batch.targets[i] else named_color(prompt)
            if name in self.colors:
                scores[i] = float(nearest[-1] == name)
        return RewardOutput.from_scores(scores, {"nearest_color": nearest})


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation, articles and extra whitespace (SQuAD-style)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@register_reward("exact_match")
class ExactMatchReward(Reward):
    """1 if the normalised answer equals the normalised target, else 0 (needs `targets`)."""

    modalities = ("text",)

    def __init__(self, normalize: bool = True):
        self.normalize = normalize

    def score(self, batch, context: RewardContext) -> RewardOutput:
        if not batch.targets:
            raise ValueError("exact_match needs reference answers: give the text task `answers`")
        norm = normalize_answer if self.normalize else (lambda s: s.strip())
        return RewardOutput.from_scores([float(norm(a) == norm(t)) for a, t in zip(batch.answers, batch.targets)])


@register_reward("plan_target")
class PlanTargetReward(Reward):
    """1 if a reasoned rollout's plan names its target (`targets`, else the prompt's color word), else 0:
    a format/resolution reward on the plan of `reasoning` rollouts ("an image the color of a ripe banana"
    -> does the plan say "yellow"?). `exclusive: true` also gives 0 to a plan that names any other
    of `words` (default: the color names), so listing every color does not pay. Invalid on rollouts
    without plans or targets."""

    modalities = ("image",)

    def __init__(self, exclusive: bool = True, words: list[str] | None = None):
        self.exclusive, self.words = exclusive, set(words or COLORS)

    def score(self, batch, context: RewardContext) -> RewardOutput:
        plans = getattr(batch, "plans", None)
        scores = torch.full((len(batch),), float("nan"))
        if plans is None:
            return RewardOutput.from_scores(scores)
        for i, (prompt, plan) in enumerate(zip(batch.prompts, plans)):
            target = batch.targets[i] if batch.targets and batch.targets[i] else named_color(prompt)
            if not target:
                continue
            said = set(re.findall(r"[a-z]+", plan.lower()))
            scores[i] = float(target in said and not (self.exclusive and (said & self.words) - {target}))
        return RewardOutput.from_scores(scores, {"plan": list(plans)})
