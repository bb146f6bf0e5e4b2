"""The policy judges its own images: "what I cannot create, I do not understand" read backwards.

Two rewards:

- `self_understanding`: the yes-probability of "Does this image show <prompt>?" asked to the
  policy's own understanding side, optionally one question per object/attribute phrase of the
  prompt, averaged;
- `cycle_consistency`: the policy captions its own image and the caption is scored against the
  prompt, by CLIP text-tower similarity or by a VLM judge.
"""
from __future__ import annotations

import json
import math
import re
from contextlib import nullcontext

import torch

from .base import Reward, RewardContext, RewardOutput, register_reward
from .clip import ClipReward
from .judges import VLMJudge

_LEAD = re.compile(r"^(?:an?\s+|the\s+)?(?:photo|picture|image|painting|drawing|rendering|render|illustration|"
                   r"sketch)\s+of\s+", re.I)
_SPLIT = re.compile(r"\s*(?:[,;]|\band\b|\bwith\b|\bnext to\b|\bbeside\b|\bon top of\b|\babove\b|\bbelow\b|"
                    r"\bunder\b|\bbehind\b|\bin front of\b|\bto the (?:left|right) of\b|\bnear\b|\bholding\b)\s*", re.I)


def extract_objects(prompt: str) -> list[str]:
    """Object/attribute phrases of a prompt, for one question each.

    "a photo of a red apple and a blue cup" -> ["a red apple", "a blue cup"]: a leading
    "a photo of" is dropped, the rest is split at commas, "and", "with" and spatial relations
    ("next to", "on top of", ...). A prompt that does not split is its own single phrase.
    """
    p = _LEAD.sub("", prompt.strip().rstrip("."))
    parts = [x.strip() for x in _SPLIT.split(p) if x and x.strip()]
    parts = [x for x in parts if re.search(r"[A-Za-z]", x) and x.lower() not in ("a", "an", "the")]
    return parts or [prompt.strip()]


def _judge_context(policy, who: str):
    return policy.reference() if who == "reference" else nullcontext()


def _check_who(name: str, value: str):
    if value not in ("reference", "policy"):
        raise ValueError(f"{name} must be 'reference' or 'policy', got {value!r}")


@register_reward("self_understanding")
class SelfUnderstandingReward(Reward):
    """P(yes) / (P(yes) + P(no)) of the policy's own answer to "Does this image show <prompt>?".

    judge: "reference" asks the frozen base (adapter disabled), so the policy cannot learn to
    flatter itself; "policy" asks the current policy (the SRUM/UniRL self-rewarding variant).
    questions: "prompt" asks one question about the whole prompt; "objects" asks
    `object_question` once per phrase `extract_objects` finds and averages the answers.
    questions_file: a JSONL file of {"prompt": ..., "questions": [...]} that overrides both for
    the prompts it lists (hand-written or LLM-written questions, TIFA/DSG style).

    SRUM's local rewards: `regions: [rows, cols]` also asks the questions about every cell of a
    grid, and `regions_file` (JSONL {"prompt": ..., "regions": [{"box": [x0, y0, x1, y1], "question":
    ...}]}, box corners as fractions of width and height) asks each listed box its own question for
    that prompt. A region is cropped and resized to the image's size before it is asked. The score is
    then global_weight * global + local_weight * mean(local); details hold both parts.
    """

    modalities = ("image",)
    uses_policy = True  # asks the policy being trained (or its adapter-disabled reference)

    def __init__(self, question: str = "Does this image show {prompt}? Answer yes or no.",
                 judge: str = "reference", batch_size: int = 32, questions: str = "prompt",
                 object_question: str = "Does this image show {object}? Answer yes or no.",
                 questions_file: str | None = None, regions: list[int] | None = None,
                 regions_file: str | None = None, global_weight: float = 1.0, local_weight: float = 0.0):
        _check_who("judge", judge)
        if regions is not None and (len(regions) != 2 or min(regions) < 1):
            raise ValueError(f"regions must be [rows, cols] of positive integers, got {regions!r}")
        if local_weight and regions is None and regions_file is None:
            raise ValueError("local_weight needs regions ([rows, cols]) or a regions_file")
        self.grid, self.global_weight, self.local_weight = regions, global_weight, local_weight
        self.boxes = load_regions_file(regions_file) if regions_file else {}
        if "{prompt}" not in question:
            raise ValueError("question must contain '{prompt}'")
        if questions not in ("prompt", "objects"):
            raise ValueError(f"questions must be 'prompt' or 'objects', got {questions!r}")
        if questions == "objects" and "{object}" not in object_question:
            raise ValueError("object_question must contain '{object}'")
        self.question, self.judge, self.batch_size = question, judge, batch_size
        self.questions, self.object_question = questions, object_question
        self.fixed = load_questions_file(questions_file) if questions_file else {}

    def questions_for(self, prompt: str) -> list[str]:
        if prompt in self.fixed:
            return self.fixed[prompt]
        if self.questions == "objects":
            return [self.object_question.format(object=o) for o in extract_objects(prompt)]
        return [self.question.format(prompt=prompt)]

    def regions_for(self, prompt: str) -> list[tuple[tuple[float, float, float, float], list[str]]]:
        """(box, questions) per local region of a prompt: its regions_file boxes, else the grid's cells."""
        if prompt in self.boxes:
            return self.boxes[prompt]
        if self.grid is None:
            return []
        rows, cols = self.grid
        return [((c / cols, r / rows, (c + 1) / cols, (r + 1) / rows), self.questions_for(prompt))
                for r in range(rows) for c in range(cols)]

    def ask(self, policy, images: torch.Tensor, owner: list[int], qs: list[str], n: int) -> torch.Tensor:
        """Mean yes-probability per owner (n owners) of (images[k], qs[k])."""
        idx, out = torch.tensor(owner), []
        with _judge_context(policy, self.judge):
            for i in range(0, len(qs), self.batch_size):
                out.append(policy.yes_probability(images[i:i + self.batch_size], qs[i:i + self.batch_size]).float().cpu())
        probs = torch.cat(out)
        sums = torch.zeros(n).index_add_(0, idx, probs)
        return sums / torch.zeros(n).index_add_(0, idx, torch.ones_like(probs))

    @torch.no_grad()
    def score(self, batch, context: RewardContext) -> RewardOutput:
        policy = context.policy
        if policy is None or not hasattr(policy, "yes_probability"):
            raise ValueError("self_understanding needs a policy with an understanding side (Janus)")
        owner, qs = [], []
        for i, p in enumerate(batch.prompts):
            for q in self.questions_for(p):
                owner.append(i)
                qs.append(q)
        whole = self.ask(policy, batch.images[torch.tensor(owner)], owner, qs, len(batch))
        details = {"questions": [self.questions_for(p) for p in batch.prompts]}
        if self.grid is None and not self.boxes:
            return RewardOutput.from_scores(whole, details)
        # local: one owner per (image, region); a region's questions averaged, then the regions
        crops, r_owner, r_qs, region_of = [], [], [], []
        for i, p in enumerate(batch.prompts):
            for box, questions in self.regions_for(p):
                crop = crop_region(batch.images[i], box)
                for q in questions:
                    crops.append(crop)
                    r_owner.append(len(region_of))
                    r_qs.append(q)
                region_of.append(i)
        local = torch.full((len(batch),), float("nan"))
        if region_of:
            per_region = self.ask(policy, torch.stack(crops), r_owner, r_qs, len(region_of))
            ridx = torch.tensor(region_of)
            sums = torch.zeros(len(batch)).index_add_(0, ridx, per_region)
            counts = torch.zeros(len(batch)).index_add_(0, ridx, torch.ones_like(per_region))
            local = torch.where(counts > 0, sums / counts.clamp(min=1), local)
        # an image without regions is scored by its global part alone
        total = self.global_weight * whole + self.local_weight * torch.nan_to_num(local, nan=0.0)
        total = torch.where(local.isnan(), self.global_weight * whole, total)
        return RewardOutput.from_scores(total, {**details, "global": whole.tolist(), "local": local.tolist()})


def crop_region(image: torch.Tensor, box) -> torch.Tensor:
    """The (H, W, 3) image's box (x0, y0, x1, y1 as fractions), resized back to (H, W) (nearest)."""
    H, W = image.shape[:2]
    x0, y0, x1, y1 = box
    c0, r0 = min(int(x0 * W), W - 1), min(int(y0 * H), H - 1)
    c1, r1 = max(c0 + 1, min(W, math.ceil(x1 * W))), max(r0 + 1, min(H, math.ceil(y1 * H)))
    crop = image[r0:r1, c0:c1].permute(2, 0, 1)[None].float()
    return torch.nn.functional.interpolate(crop, size=(H, W), mode="nearest")[0].permute(1, 2, 0)


def _jsonl_rows(path: str, expected: str):
    """(line number, parsed object) of each non-empty line of a JSONL file; a bad line names file:line."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: expected {expected}: {e}") from None


def load_regions_file(path: str) -> dict:
    """prompt -> [(box, [question])] from a JSONL file of {"prompt", "regions": [{"box", "question"}]}."""
    expected = '{"prompt": ..., "regions": [{"box": [x0, y0, x1, y1], "question": ...}]}'
    out = {}
    for n, row in _jsonl_rows(path, expected):
        try:
            regions = [(tuple(float(v) for v in r["box"]), [r["question"]]) for r in row["regions"]]
            prompt = row["prompt"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{n}: expected {expected}: {e}") from None
        for box, _ in regions:
            if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
                raise ValueError(f"{path}:{n}: a box must be [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1 and "
                                 f"0 <= y0 < y1 <= 1, got {list(box)}")
        out[prompt] = regions
    return out


def load_questions_file(path: str) -> dict[str, list[str]]:
    expected = '{"prompt": ..., "questions": [...]}'
    out = {}
    for n, row in _jsonl_rows(path, expected):
        try:
            prompt, qs = row["prompt"], row["questions"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected {expected}: {e}") from None
        if not isinstance(qs, list) or not qs or not all(isinstance(q, str) for q in qs):
            raise ValueError(f"{path}:{n}: 'questions' must be a non-empty list of strings")
        out[prompt] = qs
    return out


CYCLE_JUDGE_TEMPLATE = (
    "An image was generated for a prompt, then described by a captioner.\nPrompt: {question}\n"
    "Caption: {answer}\nJudge how well the caption agrees with the prompt (objects, colors, counts, "
    "layout). Reply with a short reason, then end with 'Final Score: X', where X is an integer from "
    "{low} to {high}.")


@register_reward("cycle_consistency")
class CycleConsistencyReward(Reward):
    """The policy captions its own image; the caption is scored against the prompt.

    captioner: "reference" (adapter disabled, default) or "policy". Captions are greedy, at most
    `max_new_tokens` tokens, for `caption_question`.
    scorer: "clip" = cosine of the caption and the prompt through a CLIP text tower (`clip:` holds
    ClipReward arguments: model, pretrained, model_config, device); "judge" = a VLM judge in
    understanding_pointwise mode with CYCLE_JUDGE_TEMPLATE (`judge:` holds VLMJudge arguments; an
    unparseable verdict makes the sample invalid). An empty caption is the policy's failure and
    is scored, not excluded.
    """

    modalities = ("image",)
    uses_policy = True  # the policy (or its reference) writes the captions

    def __init__(self, scorer: str = "clip", caption_question: str = "Describe this image in a few words.",
                 captioner: str = "reference", max_new_tokens: int = 24, batch_size: int = 32,
                 clip: dict | None = None, judge: dict | None = None):
        _check_who("captioner", captioner)
        self.caption_question, self.captioner = caption_question, captioner
        self.max_new_tokens, self.batch_size, self.scorer = max_new_tokens, batch_size, scorer
        if scorer == "clip":
            self.clip = ClipReward(**(clip or {}))
        elif scorer == "judge":
            args = {"mode": "understanding_pointwise", "template": CYCLE_JUDGE_TEMPLATE, **(judge or {})}
            if args["mode"] != "understanding_pointwise":
                raise ValueError("cycle_consistency judge must use mode understanding_pointwise")
            self.judge = VLMJudge(**args)
        else:
            raise ValueError(f"cycle_consistency scorer must be 'clip' or 'judge', got {scorer!r}")

    @torch.no_grad()
    def captions(self, policy, images: torch.Tensor, step: int) -> list[str]:
        out = []
        with _judge_context(policy, self.captioner):
            for i in range(0, len(images), self.batch_size):
                chunk = images[i:i + self.batch_size]
                seeds = [step * 1_000_003 + i + k for k in range(len(chunk))]  # unused when greedy
                roll = policy.answer(chunk, [self.caption_question] * len(chunk), seeds,
                                     max_new_tokens=self.max_new_tokens, temperature=0.0)
                out += roll.answers
        return out

    def score(self, batch, context: RewardContext) -> RewardOutput:
        policy = context.policy
        if policy is None or not hasattr(policy, "answer"):
            raise ValueError("cycle_consistency needs a policy that can caption images (Janus)")
        caps = self.captions(policy, batch.images, context.step)
        if self.scorer == "clip":
            return RewardOutput.from_scores(self.clip.text_cosine(caps, list(batch.prompts)), {"caption": caps})
        out = self.judge.score_pointwise(batch.images, [{"question": p, "answer": c}
                                                        for p, c in zip(batch.prompts, caps)])
        out.details["caption"] = caps
        return out

    def close(self):
        if self.scorer == "judge":
            self.judge.close()
