"""Parsers for judge verdicts: every format returns a number or an explicit "unparseable".

A judge's text is untrusted input. A parser either returns a `Verdict` with a float `value`, or a
`Verdict` with `value=None` and an `error` saying why; the caller marks that sample invalid
(excluded from the advantages, counted in `reward/<name>/invalid`), never scores it 0.

Formats (UnifiedReward style):

- pointwise (`parse_final_score`): `Final Score: X`, X in [low, high] (1-5 or 1-10 for
  generation judges, 0-100 for understanding judges);
- pairwise (`parse_preference`): `Image 1 is better` / `Image 2 is better` for images,
  `Answer 1 is better` / `Answer 2 is better` for answers, and a tie where the checkpoint allows it;
  the value is the first candidate's share of the win: 1.0, 0.0, or 0.5 for a tie;
- chain-of-thought variants (`cot=True`): the verdict must sit inside `<answer>...</answer>`.

Precise rules, shared by all formats (each has a test in tests/test_rewards.py):

1. Empty or whitespace-only text -> unparseable ("empty").
2. A generation that did not finish (it hit max_tokens: `finished=False`) -> unparseable
   ("truncated"), whatever the text says: the number may be cut ("Final Score: 1" from "10") and
   a later, contradicting verdict may be missing.
3. Markdown emphasis (`*`, `**`) is removed before matching; matching is case-insensitive.
   Only ASCII digits count as digits.
4. CoT: exactly one `<answer>` opening tag and a `</answer>` after it; the verdict is searched for
   only inside that block. No block, several blocks, or an unclosed block -> unparseable.
5. Several verdicts in the searched text (two `Final Score` markers, two `... is better`) ->
   unparseable, even when they agree, unless `several="last"` (then the last one counts).
6. Pointwise: the marker is `Final Score` followed by an optional `:`, `=` or `is`, then a number
   `[+-]?digits[.digits]`. The number must end at a word boundary ("5th", "1e3" -> malformed); an
   optional `/N` or `out of N` must name the configured upper bound; any further digit before the
   end of that sentence ("Final Score: 3 or 4") -> unparseable. The value must lie in [low, high]
   (compared as floats: "10" > "9"), and be a whole number when `integer=True`.
7. Pairwise: `<Subject> <label> is [much|slightly|clearly|significantly] better` with a label in
   `labels`; a label outside them ("Image 3") -> unparseable; a negation just before the verdict in
   the same clause ("neither Image 1 nor Image 2 is better") -> unparseable; a tie phrase is a tie
   (0.5) when `allow_tie`, else unparseable; a tie phrase together with a winner -> unparseable.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

POINTWISE_MODES = ("generation_pointwise", "understanding_pointwise")
PAIRWISE_MODES = ("generation_pairwise", "understanding_pairwise")
MODES = POINTWISE_MODES + PAIRWISE_MODES

DEFAULT_TIE_PATTERN = (r"\b(?:it'?s a tie|tie|equally good|equally bad|equally well|equally "
                       r"(?:accurate|correct|helpful)|both (?:images|answers) are (?:equally )?(?:good|bad|"
                       r"correct|wrong))\b")


@dataclass(frozen=True)
class Verdict:
    """A parsed judge verdict: `value` is a float, or None with the reason in `error`."""

    value: float | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.value is not None

    @classmethod
    def unparseable(cls, why: str) -> "Verdict":
        return cls(None, why)


_ANSWER_OPEN = re.compile(r"<\s*answer\s*>", re.I)
_ANSWER_CLOSE = re.compile(r"<\s*/\s*answer\s*>", re.I)
_NUMBER = r"([+-]?[0-9]+(?:\.[0-9]+)?)"
_FINAL_SCORE = re.compile(r"final\s*score", re.I)
_SCORE_VALUE = re.compile(r"\s*(?:[:：=]|\bis\b)?\s*" + _NUMBER)
_DENOMINATOR = re.compile(r"\s*(?:/|out\s+of)\s*" + _NUMBER, re.I)
_NEGATION = re.compile(r"\b(?:not|nor|neither|never|no)\b", re.I)


def verdict_region(text: str | None, cot: bool = False, finished: bool = True) -> tuple[str | None, str | None]:
    """Rules 1-4: the part of `text` that may hold the verdict, or (None, why)."""
    if text is None or not text.strip():
        return None, "empty"
    if not finished:
        return None, "truncated: the judge hit max_tokens before finishing"
    text = text.replace("*", "")
    if not cot:
        return text, None
    opens = list(_ANSWER_OPEN.finditer(text))
    if not opens:
        return None, "no <answer> block"
    if len(opens) > 1:
        return None, f"several <answer> blocks ({len(opens)})"
    close = _ANSWER_CLOSE.search(text, opens[0].end())
    if close is None:
        return None, "unclosed <answer> block (truncated?)"
    return text[opens[0].end():close.start()], None


def _sentence_rest(text: str) -> str:
    """`text` up to the end of its sentence (newline, or '.', '!', ';' followed by space or end)."""
    m = re.search(r"\n|[.!;](?=\s|$)", text)
    return text[:m.start()] if m else text


def parse_final_score(text: str | None, low: float, high: float, *, cot: bool = False, finished: bool = True,
                      integer: bool = False, several: str = "reject") -> Verdict:
    """`Final Score: X` with X in [low, high] (rule 6), or unparseable."""
    region, why = verdict_region(text, cot, finished)
    if region is None:
        return Verdict.unparseable(why)
    markers = list(_FINAL_SCORE.finditer(region))
    if not markers:
        return Verdict.unparseable("no 'Final Score'")
    if len(markers) > 1 and several != "last":
        return Verdict.unparseable(f"several 'Final Score' verdicts ({len(markers)})")
    after = region[markers[-1].end():]
    m = _SCORE_VALUE.match(after)
    if m is None:
        return Verdict.unparseable("no number after 'Final Score'")
    rest = after[m.end():]
    if rest[:1].isalnum() or rest[:1] == "_":
        return Verdict.unparseable(f"malformed number {m.group(1) + rest[:4]!r}")
    d = _DENOMINATOR.match(rest)
    if d is not None:
        if float(d.group(1)) != float(high):
            return Verdict.unparseable(f"score given out of {d.group(1)}, expected out of {high:g}")
        rest = rest[d.end():]
    if re.search(r"[0-9]", _sentence_rest(rest)):
        return Verdict.unparseable("several numbers in the verdict sentence")
    value = float(m.group(1))
    if not math.isfinite(value) or not (low <= value <= high):
        return Verdict.unparseable(f"score {m.group(1)} out of range [{low:g}, {high:g}]")
    if integer and value != int(value):
        return Verdict.unparseable(f"score {m.group(1)} is not a whole number")
    return Verdict(value)


def parse_preference(text: str | None, subject: str = "Image", labels: tuple[str, str] = ("1", "2"), *,
                     allow_tie: bool = False, tie_pattern: str = DEFAULT_TIE_PATTERN, cot: bool = False,
                     finished: bool = True, several: str = "reject") -> Verdict:
    """`<subject> <label> is better` (rule 7): 1.0 if the first label wins, 0.0 if the second, 0.5 tie."""
    region, why = verdict_region(text, cot, finished)
    if region is None:
        return Verdict.unparseable(why)
    pattern = re.compile(rf"\b{re.escape(subject)}\s*\(?([A-Za-z0-9]+)\)?\s+is\s+"
                         r"(?:(?:much|slightly|clearly|significantly|far|a bit)\s+)?better\b", re.I)
    wins = list(pattern.finditer(region))
    ties = list(re.finditer(tie_pattern, region, re.I)) if tie_pattern else []
    if wins and ties:
        return Verdict.unparseable("contradictory: both a winner and a tie")
    if ties and not wins:
        return Verdict(0.5) if allow_tie else Verdict.unparseable("a tie, which this judge does not allow")
    if not wins:
        return Verdict.unparseable(f"no '{subject} X is better'")
    if len(wins) > 1 and several != "last":
        return Verdict.unparseable(f"several verdicts ({len(wins)})")
    m = wins[-1]
    clause = re.split(r"[.!?;,\n]", region[max(0, m.start() - 40):m.start()])[-1]
    if _NEGATION.search(clause):
        return Verdict.unparseable(f"negated verdict {region[m.start() - len(clause):m.end()].strip()!r}")
    label = m.group(1).lower()
    first, second = (str(x).lower() for x in labels)
    if label == first:
        return Verdict(1.0)
    if label == second:
        return Verdict(0.0)
    return Verdict.unparseable(f"unknown label {m.group(1)!r} (expected {labels[0]} or {labels[1]})")


def parse_verdict(text: str | None, mode: str, *, score_range: tuple[float, float] = (1, 5), cot: bool = False,
                  finished: bool = True, allow_tie: bool = False, labels: tuple[str, str] = ("1", "2"),
                  integer: bool = False, several: str = "reject", tie_pattern: str = DEFAULT_TIE_PATTERN) -> Verdict:
    """Dispatch on a judge mode (see MODES)."""
    if mode in POINTWISE_MODES:
        return parse_final_score(text, score_range[0], score_range[1], cot=cot, finished=finished,
                                 integer=integer, several=several)
    if mode in PAIRWISE_MODES:
        subject = "Image" if mode == "generation_pairwise" else "Answer"
        return parse_preference(text, subject, labels, allow_tie=allow_tie, tie_pattern=tie_pattern, cot=cot,
                                finished=finished, several=several)
    raise ValueError(f"unknown judge mode {mode!r}; known: {', '.join(MODES)}")


# ----------------------------------------------------------------------------- UnifiedReward-2.0
# Multi-dimension verdicts of the UnifiedReward-2.0 checkpoints (CodeGoat24/UnifiedReward,
# `inference_qwen/UnifiedReward-2.0-inference/`). Pointwise, one line per dimension and optionally a
# final score:
#     Alignment Score (1-5): 2.694700002670288
#     Coherence Score (1-5): 2.371500015258789
#     Style Score (1-5): 2.802500009536743
# Pairwise, a block per dimension whose two relative scores sum to 1:
#     Alignment Score:
#      Image 1: 0.435699999332428
#      Image 2: 0.564300000667572
# Rules 1-4 above apply (empty, truncated, markdown, <answer> block). Then: every expected dimension
# exactly once (a repeated one -> unparseable, even if equal); the value a plain number ending the line
# (rule 6's number, nothing but spaces or a final '.' after it); a written range must be the configured
# one; values in range; pairwise: exactly one "Image 1:" and one "Image 2:" per block, both in [0, 1],
# summing to 1 within `sum_tol`. Any violation -> unparseable (invalid), never 0.

UR2_DIMENSIONS = ("alignment", "coherence", "style")
_DIM_LINE = re.compile(r"^[ \t]*([A-Za-z][A-Za-z ]*?)[ \t]+Score[ \t]*(?:\(([^)]*)\))?[ \t]*[:：=][ \t]*(.*)$",
                       re.I | re.M)
_RANGE = re.compile(r"^\s*" + _NUMBER + r"\s*[-–~]\s*" + _NUMBER + r"\s*$")
_LINE_NUMBER = re.compile(r"^" + _NUMBER + r"\s*\.?\s*$")
# "Image 1: x": the value runs to the line end or to the next "Image N:" on the same line
_PAIR_ITEM = re.compile(r"\b(Image|Answer)\s*([0-9]+)\s*[:：=][ \t]*([^\n]*?)[ \t]*"
                        r"(?=\b(?:Image|Answer)\s*[0-9]+\s*[:：=]|\n|$)", re.I)


@dataclass(frozen=True)
class DimensionVerdict:
    """Parsed multi-dimension verdict: `scores` per dimension (lower-case name -> float, or -> (s1, s2)
    for pairwise), the optional `final` score, or `error` when unparseable."""

    scores: dict | None
    final: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.scores is not None

    def value(self, use: str = "mean") -> float | None:
        """One number: `mean` of the dimensions (pointwise) or of image 1's shares (pairwise), a dimension's
        own score, or `final` (None when the verdict had no final score)."""
        if not self.ok:
            return None
        if use == "final":
            return self.final
        vals = {k: (v[0] / (v[0] + v[1]) if isinstance(v, tuple) else v) for k, v in self.scores.items()}
        if use == "mean":
            return sum(vals.values()) / len(vals)
        if use.lower() not in vals:
            raise ValueError(f"no dimension {use!r} in the verdict (has {sorted(vals)})")
        return vals[use.lower()]


def _dimension_lines(region: str):
    """(name, range text or None, value text) for every '<Name> Score [(range)]: value' line."""
    for m in _DIM_LINE.finditer(region):
        yield " ".join(m.group(1).lower().split()), m.group(2), m.group(3).strip()


def parse_dimension_scores(text: str | None, low: float = 1, high: float = 5,
                           dimensions: tuple[str, ...] | None = UR2_DIMENSIONS, *, cot: bool = False,
                           finished: bool = True) -> DimensionVerdict:
    """UnifiedReward-2.0 pointwise verdict: one `<Dim> Score (low-high): X` line per dimension.

    dimensions: the names that must all appear (others are kept too); None = whatever appears (>= 1).
    A `Final Score: X` line, when present, must also be a valid number in range (it is `final`)."""
    region, why = verdict_region(text, cot, finished)
    if region is None:
        return DimensionVerdict(None, error=why)
    scores: dict[str, float] = {}
    final = None
    for name, rng, raw in _dimension_lines(region):
        if rng is not None:
            r = _RANGE.match(rng)
            if r is None or (float(r.group(1)), float(r.group(2))) != (float(low), float(high)):
                return DimensionVerdict(None, error=f"{name} score given on range ({rng}), expected ({low:g}-{high:g})")
        m = _LINE_NUMBER.match(raw)
        if m is None:
            return DimensionVerdict(None, error=f"{name} score {raw!r} is not a single number")
        value = float(m.group(1))
        if not (low <= value <= high):
            return DimensionVerdict(None, error=f"{name} score {m.group(1)} out of range [{low:g}, {high:g}]")
        if name == "final":
            if final is not None:
                return DimensionVerdict(None, error="several 'Final Score' lines")
            final = value
            continue
        if name in scores:
            return DimensionVerdict(None, error=f"several '{name} score' lines")
        scores[name] = value
    missing = [d for d in (dimensions or ()) if d.lower() not in scores]
    if missing:
        return DimensionVerdict(None, error=f"missing dimension(s): {', '.join(missing)}")
    if not scores:
        return DimensionVerdict(None, error="no '<dimension> Score: X' line")
    return DimensionVerdict(scores, final)


def parse_pairwise_dimension_scores(text: str | None, dimensions: tuple[str, ...] | None = UR2_DIMENSIONS, *,
                                    subject: str = "Image", sum_tol: float = 0.02, cot: bool = False,
                                    finished: bool = True) -> DimensionVerdict:
    """UnifiedReward-2.0 pairwise verdict: per dimension a `<Dim> Score:` header followed by
    `Image 1: x` and `Image 2: y` (x, y in [0, 1], x + y = 1 within sum_tol). scores[dim] = (x, y)."""
    region, why = verdict_region(text, cot, finished)
    if region is None:
        return DimensionVerdict(None, error=why)
    heads = list(_DIM_LINE.finditer(region))
    scores: dict[str, tuple[float, float]] = {}
    for k, h in enumerate(heads):
        name = " ".join(h.group(1).lower().split())
        end = heads[k + 1].start() if k + 1 < len(heads) else len(region)
        block = region[h.start(3):end]  # the rest of the header line, then the block's lines
        items = [m for m in _PAIR_ITEM.finditer(block) if m.group(1).lower() == subject.lower()]
        got: dict[str, float] = {}
        for m in items:
            raw = m.group(3).rstrip(".,;/ \t")
            if not re.fullmatch(_NUMBER, raw):
                return DimensionVerdict(None, error=f"{name}: {subject} {m.group(2)} score {m.group(3)!r} is not a number")
            if m.group(2) not in ("1", "2"):
                return DimensionVerdict(None, error=f"{name}: unknown label '{subject} {m.group(2)}'")
            if m.group(2) in got:
                return DimensionVerdict(None, error=f"{name}: several '{subject} {m.group(2)}' scores")
            got[m.group(2)] = float(raw)
        if set(got) != {"1", "2"}:
            return DimensionVerdict(None, error=f"{name}: needs one '{subject} 1' and one '{subject} 2' score")
        x, y = got["1"], got["2"]
        if not (0 <= x <= 1 and 0 <= y <= 1):
            return DimensionVerdict(None, error=f"{name}: scores {x:g}, {y:g} outside [0, 1]")
        if sum_tol is not None and abs(x + y - 1) > sum_tol:
            return DimensionVerdict(None, error=f"{name}: scores {x:g} + {y:g} do not sum to 1")
        if x + y == 0:
            return DimensionVerdict(None, error=f"{name}: both scores are 0")
        if name in scores:
            return DimensionVerdict(None, error=f"several '{name} score' blocks")
        scores[name] = (x, y)
    missing = [d for d in (dimensions or ()) if d.lower() not in scores]
    if missing:
        return DimensionVerdict(None, error=f"missing dimension(s): {', '.join(missing)}")
    if not scores:
        return DimensionVerdict(None, error=f"no '<dimension> Score:' block with {subject} 1 / {subject} 2")
    return DimensionVerdict(scores)
