"""Think, then draw: T2I-R1's reasoning-then-image rollout (BiCoT-GRPO's trajectory) for Janus.

One trajectory, two segments, both sampled by the policy being trained:

1. **plan**: text sampled after `instruction.format(prompt=...)` in the chat template, at most
   `max_new_tokens`, ending at EOS or at a `stop` string's token (kept: it was sampled and is trained);
2. **image**: image tokens sampled after the generation prompt `image_prompt.format(prompt, plan)`
   (T2I-R1: `f"{prompt}. {plan}"`), through `sample_images`, i.e. the same samplers, CFG and
   log-prob modes as a plain image rollout.

CFG's unconditional branch is the plain one (`unconditional_ids`): every token but BOS and
<begin_of_image> becomes pad, *the plan included*. That is T2I-R1's choice and the consistent one:
the plan is part of the condition (the model wrote it from the prompt), so guidance u + s(c - u)
pushes towards prompt + plan; an unconditional branch that kept the plan would subtract the plan's
own effect and guide only by what the raw prompt adds to it. Both rows have the same length and
positions, so sampling and teacher forcing build them identically.

The plan is re-tokenised inside the image prompt (as T2I-R1 does: text in, text out); its sampled
token ids are kept for the plan segment's log-probs, which are the language-model head's over
`plan_prompt_ids + plan_ids`, with no image.
"""
from __future__ import annotations

import hashlib

import torch

from .batches import ReasonedImageRollout

DEFAULT_INSTRUCTION = ("{prompt}\nBefore drawing it, describe the image to generate: every object, its attributes "
                       "(color, shape, texture) and their relations, in 50 words or less.")
DEFAULT_IMAGE_PROMPT = "{prompt}. {plan}"


def plan_seed(seed: int) -> int:
    """The plan's randomness: a stream independent of the image's (which uses `seed` itself)."""
    return int.from_bytes(hashlib.blake2b(f"plan/{int(seed)}".encode(), digest_size=8).digest(), "little") >> 1


class ReasoningSampler:
    """Adds `sample_reasoned_images` to a policy that has `_chat`, `_sample_text`, `_decode_text` and
    `sample_images` (Janus)."""

    def encode_plan_prompts(self, prompts: list[str], instruction: str):
        texts = [self._chat(instruction.format(prompt=p), image=False) for p in prompts]
        enc = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def stop_token_ids(self, stop: list[str]) -> list[int]:
        """The single token each stop string is (a multi-token or unknown string cannot stop a plan)."""
        out = []
        for s in stop:
            ids = self.tokenizer.encode(s, add_special_tokens=False)
            if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
                raise ValueError(f"reasoning.stop: {s!r} is not a single token of this tokenizer ({ids})")
            out.append(ids[0])
        return out

    @torch.no_grad()
    def sample_reasoned_images(self, prompts: list[str], seeds: list[int], instruction: str = DEFAULT_INSTRUCTION,
                               max_new_tokens: int = 64, stop: list[str] = (), image_prompt: str = DEFAULT_IMAGE_PROMPT,
                               plan_temperature: float | None = None, enabled: bool = True, cfg_scale: float = 5.0,
                               temperature: float = 1.0, top_k: int = 0, group_ids=None, targets=None,
                               decode: bool = True, sampler: str = "auto") -> ReasonedImageRollout:
        """Plan, then image, per entry of `prompts`; seeded per sample (plan and image streams apart).
        `enabled: false` (the plan ablation) samples no plan: the image sees the raw prompt (not
        `image_prompt` with an empty plan, which would change the prompt) and the plan segment is empty."""
        B = len(prompts)
        plan_temp = temperature if plan_temperature is None else plan_temperature
        pids, pmask = self.encode_plan_prompts(prompts, instruction)
        if enabled:
            plan, amask, lps, ent = self._sample_text(pids, pmask, None, [plan_seed(s) for s in seeds], max_new_tokens,
                                                      plan_temp, self.stop_token_ids(list(stop)))
            plans = self._decode_text(plan, amask)
            image_texts = [image_prompt.format(prompt=p, plan=t) for p, t in zip(prompts, plans)]
        else:
            plan = amask = torch.zeros(B, 0, dtype=torch.long, device=self.device)
            lps = ent = torch.zeros(B, 0, device=self.device)
            plans, image_texts = [""] * B, list(prompts)
        img = self.sample_images(image_texts, seeds, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                                 group_ids=group_ids, targets=targets, decode=decode, sampler=sampler)
        fields = {k: getattr(img, k) for k in img.__dataclass_fields__}
        fields["prompts"] = list(prompts)
        return ReasonedImageRollout(
            **fields, plan_prompt_ids=pids.cpu(), plan_prompt_mask=pmask.cpu(), plan_ids=plan.cpu(),
            plan_mask=amask.cpu(), plan_logprobs=lps.cpu(), plans=plans, plan_entropy=ent.cpu(),
            plan_temperature=float(plan_temp))


def reasoned_logprobs(policy, batch: ReasonedImageRollout, mode: str) -> torch.Tensor:
    """Teacher-forced (B, P + T) log-probs of a reasoned rollout, with gradients: the plan tokens under
    the language-model head, then the image tokens under `mode` (columns as `batch.segments`)."""
    image = policy.image_logprobs(batch.prompt_ids, batch.prompt_mask, batch.image_tokens, mode=mode,
                                  cfg_scale=batch.cfg_scale, temperature=batch.temperature, top_k=batch.top_k)
    if batch.plan_ids.shape[1] == 0:  # the plan ablation: nothing to score
        return torch.cat([image.new_zeros(image.shape[0], 0), image], 1)
    plan = policy._continuation_logprobs(batch.plan_prompt_ids, batch.plan_prompt_mask, batch.plan_ids,
                                         batch.plan_mask, None, batch.plan_temperature)
    return torch.cat([plan, image], 1)
