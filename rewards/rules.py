"""Rule rewards for understanding answers, and user Python functions named in the config.

A rule grades the *policy's* answer: an answer with no letter, no number or no required tag is a
wrong answer and scores 0 (that is the signal RL needs), unlike an unreadable *judge* verdict,
which is invalid. A missing or unreadable reference answer is a data error and raises, naming the
sample. (`exact_match` lives in rewards/builtin.py.)
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import sys
from pathlib import Path

import torch

from .base import Reward, RewardContext, RewardOutput, register_reward


def _targets(batch, reward: str) -> list[str]:
    if not getattr(batch, "targets", None) or len(batch.targets) != len(batch):
        raise ValueError(f"{reward} needs a reference answer per sample (the task's `answer` / targets)")
    return batch.targets


# ----------------------------------------------------------------------------- multiple choice
def extract_choice(text: str, letters: str = "ABCDEFGH") -> str | None:
    """The option letter an answer commits to, or None.

    In order: (1) an explicit statement ("answer is (B)", "Answer: b", "option C"), which must be
    unique; (2) the answer is just a letter, any case ("b", "(B)."), or opens with an upper-case
    letter followed by `.`, `)` or `:` ("(B) a cat", "B. a cat"; the article in "A cat" is not a
    choice); (3) exactly one distinct letter in
    parentheses anywhere ("I think (C)"). Several different letters at one level -> None.
    """
    t = (text or "").replace("*", "").strip()
    cls = f"[{re.escape(letters)}{re.escape(letters.lower())}]"
    explicit = {m.upper() for m in re.findall(rf"\b(?:answer|option|choice)\s*(?:is|:)?\s*\(?({cls})\)?(?![\w])",
                                              t, re.I)}
    explicit = {x for x in explicit if x in letters}
    if explicit:
        return explicit.pop() if len(explicit) == 1 else None
    alone = re.fullmatch(r"\(?([A-Za-z])\)?[.:]?", t)  # just the letter, any case: "b", "(b)."
    if alone and alone.group(1).upper() in letters:
        return alone.group(1).upper()
    m = re.match(rf"\(?([{re.escape(letters)}])(?:\)|[.:](?!\w)|$)", t)
    if m:
        return m.group(1)
    paren = set(re.findall(rf"\(([{re.escape(letters)}])\)", t))
    return paren.pop() if len(paren) == 1 else None


@register_reward("multiple_choice")
class MultipleChoiceReward(Reward):
    """1 if the option letter in the answer (see `extract_choice`) equals the target's, else 0."""

    modalities = ("text",)

    def __init__(self, letters: str = "ABCDEFGH"):
        if not letters or not letters.isalpha() or not letters.isupper():
            raise ValueError(f"multiple_choice letters must be upper-case letters, got {letters!r}")
        self.letters = letters

    def score(self, batch, context: RewardContext) -> RewardOutput:
        scores = []
        for i, (answer, target) in enumerate(zip(batch.answers, _targets(batch, "multiple_choice"))):
            want = extract_choice(target, self.letters)
            if want is None:
                raise ValueError(f"multiple_choice: sample {i} has target {target!r}, not an option letter "
                                 f"in {self.letters}")
            scores.append(float(extract_choice(answer, self.letters) == want))
        return RewardOutput.from_scores(scores)


# ----------------------------------------------------------------------------- numeric
_NUM = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?%?")


def parse_number(s: str) -> float:
    """'1,234.5' -> 1234.5, '3/4' -> 0.75, '50%' -> 0.5 (ValueError otherwise)."""
    s = s.strip().replace(",", "")
    pct = s.endswith("%")
    s = s.rstrip("%").strip()
    if "/" in s:
        a, b = s.split("/")
        v = float(a) / float(b)
    else:
        v = float(s)
    return v / 100 if pct else v


def extract_numbers(text: str) -> list[float]:
    """Numbers in `text`; the content of a LaTeX \\boxed{...} wins when there is one."""
    text = text or ""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        text = boxed[-1]
    out = []
    for m in _NUM.finditer(text):
        try:
            out.append(parse_number(m.group(0)))
        except (ValueError, ZeroDivisionError):
            continue
    return out


@register_reward("numeric")
class NumericReward(Reward):
    """1 if the answer's number is within atol + rtol * |target| of the target, else 0.

    pick: which number of the answer counts: `last` (the usual final answer), `first`, or
    `only` (an answer with several numbers scores 0).
    """

    modalities = ("text",)

    def __init__(self, atol: float = 1e-6, rtol: float = 0.0, pick: str = "last"):
        if pick not in ("last", "first", "only"):
            raise ValueError(f"numeric pick must be last, first or only, got {pick!r}")
        if atol < 0 or rtol < 0:
            raise ValueError("numeric atol and rtol must be >= 0")
        self.atol, self.rtol, self.pick = float(atol), float(rtol), pick

    def score(self, batch, context: RewardContext) -> RewardOutput:
        scores = []
        for i, (answer, target) in enumerate(zip(batch.answers, _targets(batch, "numeric"))):
            want = extract_numbers(str(target))
            if len(want) != 1:
                raise ValueError(f"numeric: sample {i} has target {target!r}, not a single number")
            got = extract_numbers(answer)
            if not got or (self.pick == "only" and len(got) != 1):
                scores.append(0.0)
                continue
            x = got[-1] if self.pick == "last" else got[0]
            scores.append(float(abs(x - want[0]) <= self.atol + self.rtol * abs(want[0])))
        return RewardOutput.from_scores(scores)


# ----------------------------------------------------------------------------- format
@register_reward("format")
class FormatReward(Reward):
    """1 if the answer has the required shape, else 0.

    tag: a required `<tag>...</tag>` with non-empty content (e.g. `answer`); pattern: a regular
    expression searched for (or, with `fullmatch: true`, matched against the whole stripped
    answer). Give one or both; both must hold.
    """

    modalities = ("text",)

    def __init__(self, tag: str | None = None, pattern: str | None = None, fullmatch: bool = False,
                 ignore_case: bool = False):
        if not tag and not pattern:
            raise ValueError("format needs `tag` (e.g. answer) or `pattern` (a regular expression)")
        flags = re.S | (re.I if ignore_case else 0)
        self.checks = []
        if tag:
            if not re.fullmatch(r"[A-Za-z][\w-]*", tag):
                raise ValueError(f"format tag must be a tag name such as 'answer', got {tag!r}")
            self.checks.append(lambda s, r=re.compile(rf"<{tag}>\s*\S.*?</{tag}>", flags): r.search(s) is not None)
        if pattern:
            try:
                rx = re.compile(pattern, flags)
            except re.error as e:
                raise ValueError(f"format pattern {pattern!r} is not a valid regular expression: {e}") from None
            self.checks.append((lambda s: rx.fullmatch(s.strip()) is not None) if fullmatch
                               else (lambda s: rx.search(s) is not None))

    def score(self, batch, context: RewardContext) -> RewardOutput:
        return RewardOutput.from_scores([float(all(c(a or "") for c in self.checks)) for a in batch.answers])


# ----------------------------------------------------------------------------- user functions
def load_function(spec: str):
    """`package.module:function`, `package.module.function`, or `path/to/file.py:function`."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("python reward: `function` must be 'package.module:function' or 'file.py:function'")
    if ":" in spec:
        mod_name, _, fn_name = spec.rpartition(":")
    else:
        mod_name, _, fn_name = spec.rpartition(".")
    if not mod_name or not fn_name:
        raise ValueError(f"python reward: cannot split {spec!r} into a module and a function name")
    try:
        if mod_name.endswith(".py") or "/" in mod_name:
            path = Path(mod_name).expanduser().resolve()
            if not path.exists():
                raise FileNotFoundError(f"no file {path}")
            name = f"uniloop_user_reward_{path.stem}"
            s = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(s)
            sys.modules[name] = module
            s.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except Exception as e:
        raise ValueError(f"python reward: cannot import {mod_name!r} (function: {spec!r}): "
                         f"{type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ValueError(f"python reward: module {mod_name!r} has no attribute {fn_name!r}")
    if not callable(fn):
        raise ValueError(f"python reward: {spec!r} is not callable")
    return fn


def _call_with_accepted(fn, kwargs: dict):
    """Pass the keyword arguments `fn` declares (all of them if it takes **kwargs)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return fn(**kwargs)
    names = {p.name for p in params}
    return fn(**{k: v for k, v in kwargs.items() if k in names})


def _as_score(value, where: str) -> float:
    if value is None:
        return float("nan")  # the function says "cannot score this one": invalid, not 0
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)):
        raise TypeError(f"{where} returned {type(value).__name__} {value!r}; expected a number or None")
    return float(value) if math.isfinite(value) else float("nan")


@register_reward("python")
class PythonReward(Reward):
    """A user function named in the config: `function: "mypkg.rewards:brevity"` (or a .py file).

    batched (default, TRL's convention): called once per batch with keyword arguments
    `prompts`, `completions` (answers for text rollouts, images for image rollouts), `targets`,
    `images`, plus everything under `kwargs:`; returns one number (or None = cannot score:
    invalid) per sample. `batched: false` calls it per sample with `prompt`, `completion`,
    `target`, `image`, so an exception names the sample. Arguments the function does not declare
    are not passed (unless it takes **kwargs).
    """

    def __init__(self, function: str, batched: bool = True, modalities: list[str] | None = None,
                 kwargs: dict | None = None):
        self.fn, self.spec, self.batched = load_function(function), function, batched
        self.modalities = tuple(modalities or ("text",))
        bad = set(self.modalities) - {"text", "image"}
        if bad:
            raise ValueError(f"python reward modalities must be text and/or image, got {sorted(bad)}")
        self.kwargs = dict(kwargs or {})

    def score(self, batch, context: RewardContext) -> RewardOutput:
        B = len(batch)
        completions = list(batch.answers) if batch.kind == "text" else list(batch.images)
        targets = list(batch.targets) if batch.targets else [None] * B
        if self.batched:
            out = _call_with_accepted(self.fn, {"prompts": list(batch.prompts), "completions": completions,
                                                "targets": targets, "images": batch.images, "step": context.step,
                                                **self.kwargs})
            if isinstance(out, torch.Tensor):
                out = out.flatten().tolist()
            if not hasattr(out, "__len__") or len(out) != B:
                raise TypeError(f"python reward {self.spec!r} must return {B} scores, got "
                                f"{len(out) if hasattr(out, '__len__') else type(out).__name__}")
            return RewardOutput.from_scores([_as_score(v, f"{self.spec} (sample {i})") for i, v in enumerate(out)])
        scores = []
        for i in range(B):
            try:
                v = _call_with_accepted(self.fn, {"prompt": batch.prompts[i], "completion": completions[i],
                                                  "target": targets[i], "image": batch.images[i],
                                                  "step": context.step, **self.kwargs})
            except Exception as e:
                raise RuntimeError(f"sample {i} (prompt {batch.prompts[i]!r}): {type(e).__name__}: {e}") from e
            scores.append(_as_score(v, f"{self.spec} (sample {i})"))
        return RewardOutput.from_scores(scores)
