"""GenEval-style scoring of detections against a prompt's metadata (Ghosh et al. 2023, `evaluate_images.py`).

Metadata (one JSON object per sample, carried in the rollout's `targets`), GenEval's format:

    {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    {"tag": "position", "include": [{"class": "bench", "count": 1},
                                    {"class": "dog", "count": 1, "position": ["left of", 0]}]}

- `include`: every clause must hold (AND): at least `count` detections of `class`; with `color`, at
  least `count` of the `count` most confident ones classified as that color (one of `COLORS`); with
  `position: [relation, i]`, each of them must stand in `relation` (`left of`, `right of`, `above`,
  `below`) to every object matched by include clause `i` (an earlier clause; it must have matched).
- `exclude`: fewer than `count` detections of `class` (OR over clauses: one violated -> wrong).
  GenEval's counting prompts ask for exactly N as include N + exclude N+1.
- `tag` picks the confidence threshold (`counting` uses the counting threshold); `prompt` is ignored.

Rules as GenEval has them: detections of a class are sorted by confidence, kept above the threshold
(strictly), capped at `max_objects` (16), then de-duplicated by greedy NMS with GenEval's IoU (pixel
boxes, +1 convention); `nms_iou=1` disables NMS as GenEval's default does (its Mask2Former
returns de-duplicated instances; an open-vocabulary detector does not, hence 0.5 in `detector`).
Relative position: offsets of box centres shrunk by `position_threshold` (0.1) x the summed box sizes,
then the direction's component over 0.5 of the (unshrunk) offset length names the relation.
`strict` score = GenEval's `correct` (1/0); `partial` = fraction of the include and exclude clauses that
hold (ours, a denser signal for RL; not a GenEval number).
"""
from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from typing import Callable

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")


@dataclass
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    score: float


@dataclass
class Verdict:
    correct: bool
    satisfied: int  # clauses that hold
    total: int  # include + exclude clauses
    reasons: list[str] = field(default_factory=list)

    @property
    def partial(self) -> float:
        return self.satisfied / self.total


def parse_metadata(text) -> tuple[dict | None, str | None]:
    """A sample's GenEval metadata (a JSON string or a dict), validated, or (None, why)."""
    try:
        meta = json.loads(text) if isinstance(text, str) else text
    except (TypeError, ValueError) as e:
        # a rollout job stores a record's non-string `target` as str(dict): a Python literal, read safely
        try:
            meta = ast.literal_eval(text) if isinstance(text, str) and text.lstrip().startswith("{") else None
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            meta = None
        if meta is None:
            return None, f"metadata is not JSON: {e}"
    if not isinstance(meta, dict):
        return None, "metadata must be a JSON object"
    inc, exc = meta.get("include", []), meta.get("exclude", [])
    if not isinstance(inc, list) or not isinstance(exc, list) or not (inc or exc):
        return None, "metadata needs a non-empty 'include' and/or 'exclude' list"
    for where, clauses in (("include", inc), ("exclude", exc)):
        for j, c in enumerate(clauses):
            if not isinstance(c, dict) or not isinstance(c.get("class"), str) or not c["class"].strip():
                return None, f"{where}[{j}] needs a 'class' string"
            n = c.get("count", 1)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                return None, f"{where}[{j}].count must be an integer >= 1, got {n!r}"
            if where == "exclude":
                continue
            if "color" in c and c["color"] not in COLORS:
                return None, f"include[{j}].color {c['color']!r} is not one of {', '.join(COLORS)}"
            if "position" in c:
                p = c["position"]
                if (not isinstance(p, (list, tuple)) or len(p) != 2 or p[0] not in RELATIONS
                        or isinstance(p[1], bool) or not isinstance(p[1], int) or not 0 <= p[1] < j):
                    return None, (f"include[{j}].position must be [relation, index of an earlier include "
                                  f"clause] with relation in {RELATIONS}, got {p!r}")
    return meta, None


def read_metadata_file(path: str) -> dict[str, dict]:
    """prompt -> metadata from a JSONL file whose records carry a `prompt` (GenEval's
    `evaluation_metadata.jsonl` is one); a repeated prompt must repeat the same metadata."""
    out: dict[str, dict] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            meta, err = parse_metadata(rec)
            if meta is None or not isinstance(rec.get("prompt"), str):
                raise ValueError(f"{path}:{n}: {err or 'no prompt'}")
            if out.get(rec["prompt"], meta) != meta:
                raise ValueError(f"{path}:{n}: prompt {rec['prompt']!r} has two different metadata")
            out[rec["prompt"]] = meta
    return out


def metadata_classes(meta: dict) -> list[str]:
    """The distinct class names the metadata mentions, in order of first mention."""
    out: list[str] = []
    for c in meta.get("include", []) + meta.get("exclude", []):
        if c["class"] not in out:
            out.append(c["class"])
    return out


def geneval_iou(a, b) -> float:
    """GenEval's `compute_iou`: pixel boxes with inclusive ends (+1)."""
    def area(x):
        return max(x[2] - x[0] + 1, 0) * max(x[3] - x[1] + 1, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def select_detections(dets: list[Detection], threshold: float, max_objects: int = 16,
                      nms_iou: float = 1.0) -> list[Detection]:
    """One class's detections as GenEval keeps them: sort, threshold (>), cap, greedy NMS (off at 1)."""
    order = sorted((d for d in dets if d.score > threshold), key=lambda d: -d.score)[:max_objects]
    kept = []
    while order:
        best = order.pop(0)
        kept.append(best)
        if nms_iou < 1:
            order = [d for d in order if geneval_iou(best.box, d.box) < nms_iou]
    return kept


def relative_position(a: Detection, b: Detection, position_threshold: float = 0.1) -> set[str]:
    """Relations of A to B (GenEval's `relative_position`), image y pointing down."""
    ca = ((a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2)
    cb = ((b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2)
    dims = (abs(a.box[2] - a.box[0]) + abs(b.box[2] - b.box[0]), abs(a.box[3] - a.box[1]) + abs(b.box[3] - b.box[1]))
    offset = (ca[0] - cb[0], ca[1] - cb[1])
    revised = [max(abs(o) - position_threshold * d, 0) * math.copysign(1, o) if o else 0.0
               for o, d in zip(offset, dims)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


ColorFn = Callable[[list[Detection], str], list[str]]  # (detections of one class, class) -> a color each


def evaluate(objects: dict[str, list[Detection]], meta: dict, classify_colors: ColorFn | None = None,
             position_threshold: float = 0.1) -> Verdict:
    """GenEval's `evaluate` on selected detections (class -> detections, most confident first)."""
    correct, satisfied, reasons, matched_groups = True, 0, [], []
    for req in meta.get("include", []):
        cls, n = req["class"], req.get("count", 1)
        found = objects.get(cls, [])[:n]
        matched = True
        if len(found) < n:
            matched = False
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
        else:
            if "color" in req:
                if classify_colors is None:
                    raise ValueError("a color clause needs a color classifier")
                colors = classify_colors(found, cls)
                if colors.count(req["color"]) < n:
                    matched = False
                    reasons.append(f"expected {req['color']} {cls}>={n}, found colors {colors}")
            if "position" in req and matched:
                rel, target = req["position"]
                if matched_groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    for obj in found:
                        for tgt in matched_groups[target]:
                            got = relative_position(obj, tgt, position_threshold)
                            if rel not in got:
                                matched = False
                                reasons.append(f"expected {cls} {rel} target, found {' and '.join(sorted(got)) or 'none'}")
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
        correct &= matched
        satisfied += matched
    for req in meta.get("exclude", []):
        cls, n = req["class"], req.get("count", 1)
        if len(objects.get(cls, [])) >= n:
            correct = False
            reasons.append(f"expected {cls}<{n}, found {len(objects[cls])}")
        else:
            satisfied += 1
    total = len(meta.get("include", [])) + len(meta.get("exclude", []))
    return Verdict(correct, satisfied, total, reasons)
