"""Teacher-forced log-prob sums of preference pairs, for DPO on both sides of a unified model.

Per pair the policy's summed log-probs of the chosen and the rejected sample (image tokens for a
generation pair, answer tokens for an understanding pair); the reference is the same policy with
its adapter disabled (no second copy). `ReferenceTable` holds the reference sums of a whole
preference set, computed once (and cached on disk when asked).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..policies.batches import GENERATION, UNDERSTANDING, GenerationPair, TextRollout, UnderstandingPair
from .losses import PairLogps
from .preference_sets import PreferenceSet
from .trainer import index_chunks


def answer_token_ids(policy, texts: list[str]) -> list[list[int]]:
    """Answer text -> the token ids the policy would emit after the chat prompt, ending in EOS.

    The answer follows "<|Assistant|>:" with a space, as Janus writes it.
    """
    tok = policy.tokenizer
    return [tok.encode(" " + t.strip(), add_special_tokens=False) + [tok.eos_token_id] for t in texts]


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def generation_pair_logps(policy, pair: GenerationPair, mode: str = "conditional",
                          cfg_scale: float = 5.0) -> PairLogps:
    """Teacher-forced summed log-probs of the chosen and rejected images (one forward for both)."""
    B = len(pair)
    ids, mask = policy.encode_generation_prompts(pair.prompts)
    tokens = torch.cat([pair.chosen_tokens, pair.rejected_tokens]).long()
    lp = policy.image_logprobs(ids.repeat(2, 1), mask.repeat(2, 1), tokens, mode=mode, cfg_scale=cfg_scale,
                               temperature=1.0, top_k=0)
    sums = lp.float().sum(-1)
    n = torch.full((2 * B,), float(tokens.shape[1]), device=sums.device)
    return PairLogps(sums[:B], sums[B:], n[:B], n[B:])


def understanding_pair_logps(policy, pair: UnderstandingPair) -> PairLogps:
    """Teacher-forced summed log-probs of the chosen and rejected answers, through `text_logprobs`."""
    B = len(pair)
    ids, mask, pixels = policy.encode_questions(pair.images, pair.questions)
    pad = policy.tokenizer.pad_token_id
    chosen_ids = pair.chosen_ids if pair.chosen_ids is not None else answer_token_ids(policy, pair.chosen)
    rejected_ids = pair.rejected_ids if pair.rejected_ids is not None else answer_token_ids(policy, pair.rejected)
    ans_ids, ans_mask = pad_right(list(chosen_ids) + list(rejected_ids), pad)
    batch = TextRollout(
        prompts=pair.questions * 2, images=pair.images.repeat(2, 1, 1, 1), prompt_ids=ids.repeat(2, 1),
        prompt_mask=mask.repeat(2, 1), pixel_values=pixels.repeat(2, 1, 1, 1), answer_ids=ans_ids,
        answer_mask=ans_mask, logprobs_sampled=torch.zeros(ans_ids.shape), answers=pair.chosen + pair.rejected,
        group_ids=torch.arange(2 * B), temperature=1.0)
    lp = policy.text_logprobs(batch)  # (2B, A), 0 where masked
    sums = lp.float().sum(-1)
    n = ans_mask.sum(-1).float().to(sums.device)
    return PairLogps(sums[:B], sums[B:], n[:B], n[B:])


def pair_logps(policy, pair, mode: str = "conditional", cfg_scale: float = 5.0) -> PairLogps:
    if pair.kind == GENERATION:
        return generation_pair_logps(policy, pair, mode, cfg_scale)
    return understanding_pair_logps(policy, pair)


def reference_pair_logps(policy, pair, mode: str = "conditional", cfg_scale: float = 5.0) -> PairLogps:
    """The same sums under the reference model: the policy with its adapter disabled."""
    with torch.no_grad(), policy.reference():
        return pair_logps(policy, pair, mode, cfg_scale).detach()


# ----------------------------------------------------------------------------- reference table
class ReferenceTable:
    """Reference log-probs of every pair of a PreferenceSet, computed once (optionally cached on disk)."""

    def __init__(self, generation: PairLogps, understanding: PairLogps):
        self.by_kind = {GENERATION: generation, UNDERSTANDING: understanding}

    def get(self, kind: str, index) -> PairLogps:
        return self.by_kind[kind].select(index)

    @classmethod
    def compute(cls, policy, pset: PreferenceSet, mode: str, cfg_scale: float, batch_size: int,
                cache_path: Path | None = None) -> "ReferenceTable":
        key = reference_key(policy, pset, mode, cfg_scale)
        if cache_path is not None and cache_path.exists():
            saved = torch.load(cache_path, map_location="cpu", weights_only=False)
            if saved.get("key") == key:
                return cls(PairLogps(*saved[GENERATION]), PairLogps(*saved[UNDERSTANDING]))
        parts = {}
        for kind, data in ((GENERATION, pset.generation), (UNDERSTANDING, pset.understanding)):
            chunks = [reference_pair_logps(policy, data.select(idx), mode, cfg_scale)
                      for idx in index_chunks(len(data), batch_size)]
            parts[kind] = PairLogps.cat(chunks) if chunks else PairLogps(*(torch.zeros(0) for _ in range(4)))
        table = cls(parts[GENERATION], parts[UNDERSTANDING])
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_suffix(".tmp")
            torch.save({"key": key, **{k: (v.chosen, v.rejected, v.chosen_len, v.rejected_len)
                                       for k, v in parts.items()}}, tmp)
            tmp.replace(cache_path)
        return table


def reference_key(policy, pset: PreferenceSet, mode: str, cfg_scale: float) -> str:
    """Fingerprint of (base model, pairs, log-prob mode): a cached reference table is valid iff equal."""
    h = hashlib.sha256()
    h.update(policy.model_fingerprint().encode())
    h.update(json.dumps([mode, cfg_scale]).encode())
    g, u = pset.generation, pset.understanding
    h.update(json.dumps([g.prompts, u.questions, u.chosen, u.rejected]).encode())
    for t in (g.chosen_tokens, g.rejected_tokens):
        h.update(t.numpy().tobytes())
    h.update(u.images.numpy().tobytes())
    return h.hexdigest()
