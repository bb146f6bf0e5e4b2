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
    """

    modalities = ("image",)
    uses_policy = True  # asks the policy being trained (or its adapter-disabled reference)

    def __init__(self, question: str = "Does this image show {prompt}? Answer yes or no.",
                 judge: str = "reference", batch_size: int = 32, questions: str = "prompt",
                 object_question: str = "Does this image show {object}? Answer yes or no.",
                 questions_file: str | None = None):
        _check_who("judge", judge)
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
        idx = torch.tensor(owner)
        images = batch.images[idx]
        out = []
        with _judge_context(policy, self.judge):
            for i in range(0, len(qs), self.batch_size):
                out.append(policy.yes_probability(images[i:i + self.batch_size], qs[i:i + self.batch_size]).float().cpu())
        probs = torch.cat(out)
        sums = torch.zeros(len(batch)).index_add_(0, idx, probs)
        counts = torch.zeros(len(batch)).index_add_(0, idx, torch.ones_like(probs))
        return RewardOutput.from_scores(sums / counts, {"questions": [self.questions_for(p) for p in batch.prompts]})


def load_questions_file(path: str) -> dict[str, list[str]]:
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt, qs = row["prompt"], row["questions"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected {{\"prompt\": ..., \"questions\": [...]}}: {e}") from None
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
