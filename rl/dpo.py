"""Offline DPO on preference pairs, for both sides of a unified model (`algorithm: dpo`).

Per pair the policy's summed log-probs of the chosen and the rejected sample (image tokens for a
generation pair, answer tokens for an understanding pair) are compared with the same sums under
the reference model, which is the policy with its LoRA adapter disabled (no second copy):

    delta = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))

and turned into a loss by name (`dpo.loss_type`, TRL's names; several are summed with
`dpo.loss_weights`):

    sigmoid  -(1-e) log s(beta*delta) - e log s(-beta*delta)        (e = label_smoothing: cDPO)
    robust   (-(1-e) log s(beta*delta) + e log s(-beta*delta)) / (1-2e)       (rDPO)
    hinge    relu(1 - beta*delta)
    ipo      (delta_avg - 1/(2*beta))^2, delta_avg from per-token averages (as TRL does)
    sft      mean NLL per token of the chosen sample
    + rpo_alpha * (mean NLL per token of the chosen sample), when rpo_alpha is set.

Implicit rewards are beta * (log pi - log ref); `dpo/accuracy` is the fraction of pairs whose
chosen reward is above the rejected one, a tie counting one half (so an untrained adapter, equal
to the reference, reads exactly 0.5 instead of 0).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..policies.batches import TextRollout
from .algorithms import register_algorithm
from .checkpoint import resume_trainer, save_trainer
from .preference_data import (GENERATION, UNDERSTANDING, GenerationPair, PreferenceRecords, PreferenceSet,
                              UnderstandingPair, build_preference_set, read_preference_records, vq_model_key)

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sft")


# ----------------------------------------------------------------------------- log-probs
@dataclass
class PairLogps:
    """Summed log-probs of the chosen and rejected samples of B pairs, and how many tokens each sums."""

    chosen: torch.Tensor  # (B,)
    rejected: torch.Tensor  # (B,)
    chosen_len: torch.Tensor  # (B,) float
    rejected_len: torch.Tensor  # (B,) float

    def __len__(self) -> int:
        return len(self.chosen)

    def detach(self) -> "PairLogps":
        return PairLogps(*(t.detach().float().cpu() for t in (self.chosen, self.rejected, self.chosen_len,
                                                               self.rejected_len)))

    def select(self, index) -> "PairLogps":
        index = torch.as_tensor(list(index), dtype=torch.long)
        return PairLogps(self.chosen[index], self.rejected[index], self.chosen_len[index], self.rejected_len[index])

    def to(self, device) -> "PairLogps":
        return PairLogps(*(t.to(device) for t in (self.chosen, self.rejected, self.chosen_len, self.rejected_len)))

    @staticmethod
    def cat(parts: list["PairLogps"]) -> "PairLogps":
        return PairLogps(*(torch.cat([getattr(p, f) for p in parts])
                           for f in ("chosen", "rejected", "chosen_len", "rejected_len")))


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


# ----------------------------------------------------------------------------- losses
@dataclass
class DPOOutput:
    losses: torch.Tensor  # (B,) per-pair loss, the weighted sum over loss types (mean it for the batch loss)
    chosen_rewards: torch.Tensor  # (B,) beta * (log pi - log ref) of the chosen sample, detached
    rejected_rewards: torch.Tensor  # (B,)


def dpo_losses(policy: PairLogps, ref: PairLogps, beta: float, loss_type=("sigmoid",), loss_weights=None,
               label_smoothing: float = 0.0, rpo_alpha: float | None = None) -> DPOOutput:
    """Per-pair DPO losses from summed log-probs (see the module docstring for the formulas)."""
    if isinstance(loss_type, str):
        loss_type = [loss_type]
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(loss_type)
    if len(weights) != len(loss_type):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(loss_type)} loss types")
    eps = float(label_smoothing)
    ref = ref.to(policy.chosen.device)
    chosen_ratio = policy.chosen - ref.chosen
    rejected_ratio = policy.rejected - ref.rejected
    delta = chosen_ratio - rejected_ratio
    chosen_nll = -policy.chosen / policy.chosen_len.clamp(min=1)
    total = torch.zeros_like(delta)
    for name, w in zip(loss_type, weights):
        if name == "sigmoid":
            per = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
        elif name == "robust":
            if not 0 <= eps < 0.5:
                raise ValueError(f"robust DPO needs label_smoothing in [0, 0.5), got {eps}")
            per = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
        elif name == "hinge":
            per = torch.relu(1 - beta * delta)
        elif name == "ipo":
            avg = chosen_ratio / policy.chosen_len.clamp(min=1) - rejected_ratio / policy.rejected_len.clamp(min=1)
            per = (avg - 1 / (2 * beta)) ** 2
        elif name == "sft":
            per = chosen_nll
        else:
            raise ValueError(f"unknown DPO loss_type {name!r}; choose from {list(LOSS_TYPES)}")
        total = total + w * per
    if rpo_alpha:
        total = total + rpo_alpha * chosen_nll
    return DPOOutput(total, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def preference_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 if chosen is ranked above rejected, 0 below, 1/2 on a tie."""
    m = chosen_rewards - rejected_rewards
    return (m > 0).float() + 0.5 * (m == 0).float()


def dpo_metrics(out: DPOOutput, prefix: str = "dpo") -> dict:
    cr, rr = out.chosen_rewards.float().cpu(), out.rejected_rewards.float().cpu()
    return {f"{prefix}/loss": out.losses.detach().float().mean().item(),
            f"{prefix}/accuracy": preference_accuracy(cr, rr).mean().item(),
            f"{prefix}/margin": (cr - rr).mean().item(),
            f"{prefix}/chosen_reward": cr.mean().item(),
            f"{prefix}/rejected_reward": rr.mean().item()}


def loss_kwargs(d) -> dict:
    """dpo_losses keyword arguments from a DPOConfig."""
    return dict(beta=d.beta, loss_type=d.loss_type, loss_weights=d.loss_weights,
                label_smoothing=d.label_smoothing, rpo_alpha=d.rpo_alpha)


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
                      for idx in _chunks(len(data), batch_size)]
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
    h.update(vq_model_key(policy).encode())
    h.update(policy.janus.model.generation_head.state_dict()[next(iter(
        policy.janus.model.generation_head.state_dict()))].detach().float().cpu().numpy().tobytes())
    h.update(json.dumps([mode, cfg_scale]).encode())
    g, u = pset.generation, pset.understanding
    h.update(json.dumps([g.prompts, u.questions, u.chosen, u.rejected]).encode())
    for t in (g.chosen_tokens, g.rejected_tokens):
        h.update(t.numpy().tobytes())
    h.update(u.images.numpy().tobytes())
    return h.hexdigest()


def _chunks(n: int, size: int) -> list[list[int]]:
    size = max(1, size)
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


# ----------------------------------------------------------------------------- synthetic data
def write_synthetic_preference_set(scfg, out_dir: Path, seed: int, gen_size: int, und_size: int,
                                   num_image_tokens: int | None = None) -> tuple[Path, Path]:
    """A color preference set in the documented format: train/ and eval/ JSONL + PNG directories.

    generation:    "a red image" -> a (noisy) red image preferred over another color's image
    understanding: a red image + "What color ...?" -> "red" preferred over another color word
    Eval holds out whole (right color, wrong color) combinations, so held-out accuracy measures
    generalisation, not memorised pairs.
    """
    from ..policies.tiny import COLORS, palette, solid_color_images
    from .preference_data import PairToWrite, write_preference_jsonl

    def palette_ids(color: str) -> list[int] | None:
        # The tiny VQ's code for a solid color: every token is the palette entry nearest to it.
        if not num_image_tokens:
            return None
        k = int((palette() - torch.tensor(COLORS[color])).norm(dim=-1).argmin())
        return [k] * num_image_tokens

    unknown = [c for c in scfg.colors if c not in COLORS]
    if unknown or len(scfg.colors) < 2:
        raise ValueError(f"preference_data.synthetic.colors needs >= 2 of {sorted(COLORS)}; got {scfg.colors}")
    bad_kinds = set(scfg.kinds) - {GENERATION, UNDERSTANDING}
    if bad_kinds:
        raise ValueError(f"preference_data.synthetic.kinds: unknown {sorted(bad_kinds)}")
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    combos = [(c, r) for c in scfg.colors for r in scfg.colors if r != c]
    splits = {"train": [], "eval": []}
    for kind in scfg.kinds:
        order = combos[:]
        rng.shuffle(order)
        n_eval = max(1, round(scfg.eval_fraction * len(order))) if scfg.eval_fraction > 0 else 0
        for k, (c, r) in enumerate(order):
            split = "eval" if k < n_eval else "train"
            for _ in range(scfg.pairs_per_combination):
                if kind == GENERATION:
                    im = solid_color_images([c, r], gen_size, noise=scfg.noise, generator=g)
                    splits[split].append(PairToWrite(
                        GENERATION, im[0], im[1], prompt=scfg.prompt_template.format(color=c),
                        chosen_tokens=palette_ids(c), rejected_tokens=palette_ids(r),
                        meta={"color": c, "rejected_color": r}))
                else:
                    im = solid_color_images([c], und_size, noise=scfg.noise, generator=g)[0]
                    splits[split].append(PairToWrite(UNDERSTANDING, c, r, prompt=scfg.question, image=im,
                                                     meta={"color": c}))
    out = {}
    for split, pairs in splits.items():
        rng.shuffle(pairs)
        out[split] = write_preference_jsonl(pairs, out_dir / split) if pairs else None
    return out["train"], out["eval"]


# ----------------------------------------------------------------------------- data loading for a run
def load_run_data(cfg, policy, run_dir: Path) -> tuple[PreferenceSet, PreferenceSet, dict]:
    """Train and held-out PreferenceSets for a config, validated up front; plus data metrics."""
    pd = cfg.preference_data
    if pd is None:
        raise ValueError("algorithm: dpo needs a `preference_data` section (train files or `synthetic`)")
    train_src, eval_src = list(pd.train), list(pd.eval)
    if pd.synthetic is not None:
        from .preference_data import vq_image_size
        exact = pd.synthetic.palette_tokens and cfg.model.name_or_path == "tiny"
        tr, ev = write_synthetic_preference_set(pd.synthetic, run_dir / "synthetic_pairs", cfg.seed,
                                                vq_image_size(policy), policy.image_size,
                                                policy.num_image_tokens if exact else None)
        train_src.append(str(tr))
        if ev is not None:
            eval_src.append(str(ev))
    if not train_src:
        raise ValueError("preference_data.train is empty and no `synthetic` set is configured")
    train, held = read_train_eval(pd, train_src, eval_src, cfg.seed)
    if not len(train):
        raise ValueError(f"no training pairs left in {train.source} (skipped {train.skipped})")
    cache = Path(pd.cache_dir) if pd.cache_dir else run_dir / "cache"
    train_set = build_preference_set(policy, train, cache, use_record_tokens=pd.use_record_tokens)
    eval_set = build_preference_set(policy, held, cache, use_record_tokens=pd.use_record_tokens)
    info = {"data/train_pairs": len(train_set), "data/eval_pairs": len(eval_set),
            "data/skipped_records": train.skipped + held.skipped}
    if info["data/skipped_records"]:
        print(f"preference data: skipped {info['data/skipped_records']} invalid record(s); first: "
              f"{(train.problems + held.problems)[0]}")
    return train_set, eval_set, info


def read_train_eval(pd, train_src: list[str], eval_src: list[str], seed: int):
    """Training and held-out records from the configured sources (a held-out fraction of the training
    records when no eval source is given)."""
    train = PreferenceRecords(source=",".join(train_src))
    for src in train_src:
        train.extend(read_preference_records(src, split=pd.split, skip_invalid=pd.skip_invalid))
    held = PreferenceRecords(source=",".join(eval_src))
    for src in eval_src:
        held.extend(read_preference_records(src, split=pd.eval_split, skip_invalid=pd.skip_invalid))
    if not eval_src and pd.eval_fraction > 0:
        train, held = split_records(train, pd.eval_fraction, seed)
    return train, held


def split_records(records: PreferenceRecords, fraction: float, seed: int):
    """Hold out `fraction` of each kind, chosen by a seeded shuffle."""
    rng = random.Random(seed)
    train = PreferenceRecords(source=records.source, skipped=records.skipped, problems=records.problems)
    held = PreferenceRecords(source=records.source + " (held out)")
    for name in ("generation", "understanding"):
        items = getattr(records, name)[:]
        rng.shuffle(items)
        n = int(round(fraction * len(items))) if len(items) > 1 else 0
        setattr(held, name, items[:n])
        setattr(train, name, items[n:])
    return train, held


# ----------------------------------------------------------------------------- the trainer
class DPOTrainer:
    """Offline DPO: a fixed set of pairs, an epoch-shuffled order, AdamW on the adapter."""

    def __init__(self, cfg, policy=None):
        from ..rollouts.worker import make_policy
        self.cfg, self.d = cfg, cfg.dpo
        self.run_dir = Path(cfg.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        tiny_dir = self.run_dir.parent / ".tiny_models" / f"janus_seed{cfg.seed}"
        self.policy = policy or make_policy(cfg.model, cfg.lora, tiny_dir=tiny_dir)
        self.policy.model.train()
        self.optimizer = make_optimizer(self.policy, self.d)
        self.step = 0

    # -- data
    def setup_data(self):
        self.train_set, self.eval_set, self.data_info = load_run_data(self.cfg, self.policy, self.run_dir)
        self.items = ([(GENERATION, i) for i in range(len(self.train_set.generation))]
                      + [(UNDERSTANDING, i) for i in range(len(self.train_set.understanding))])
        d = self.d
        bs = d.precompute_ref_batch_size or d.per_device_eval_batch_size
        self.train_ref = (ReferenceTable.compute(self.policy, self.train_set, d.logprob_mode, d.cfg_scale, bs,
                                                 self.run_dir / "cache" / "ref_logps_train.pt")
                          if d.precompute_ref_log_probs else None)
        # Held-out pairs are scored at every evaluation: their reference never changes, compute it once.
        self.eval_ref = ReferenceTable.compute(self.policy, self.eval_set, d.logprob_mode, d.cfg_scale, bs,
                                               None) if len(self.eval_set) else None

    def pair_at(self, n: int):
        """The n-th pair of the run's stream: epoch e = n // N is a seeded permutation (resume-safe)."""
        N = len(self.items)
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(self.cfg.seed * 1000 + n // N))
        return self.items[int(perm[n % N])]

    # -- one step
    def train_step(self) -> dict:
        d, step = self.d, self.step + 1
        per_step = d.per_device_train_batch_size * d.gradient_accumulation_steps
        picks = [self.pair_at(n) for n in range((step - 1) * per_step, step * per_step)]
        self.optimizer.zero_grad(set_to_none=True)
        outs, t0 = [], time.perf_counter()
        for start in range(0, per_step, d.per_device_train_batch_size):
            micro = picks[start:start + d.per_device_train_batch_size]
            for kind in (GENERATION, UNDERSTANDING):
                idx = [i for k, i in micro if k == kind]
                if not idx:
                    continue
                data = self.train_set.generation if kind == GENERATION else self.train_set.understanding
                pair = data.select(idx)
                ref = (self.train_ref.get(kind, idx) if self.train_ref is not None
                       else reference_pair_logps(self.policy, pair, d.logprob_mode, d.cfg_scale))
                out = dpo_losses(pair_logps(self.policy, pair, d.logprob_mode, d.cfg_scale), ref, **loss_kwargs(d))
                (out.losses.sum() / per_step).backward()  # every pair weighs the same in the step's mean
                outs.append((kind, out))
        return finish_dpo_step(self, outs, step, t0)

    # -- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        d, m = self.d, {}
        was_training = self.policy.model.training
        self.policy.model.eval()
        try:
            if self.eval_ref is not None:
                outs = []
                for kind, data in ((GENERATION, self.eval_set.generation),
                                   (UNDERSTANDING, self.eval_set.understanding)):
                    for idx in _chunks(len(data), d.per_device_eval_batch_size):
                        if not idx:
                            continue
                        pair = data.select(idx)
                        lp = pair_logps(self.policy, pair, d.logprob_mode, d.cfg_scale)
                        outs.append((kind, dpo_losses(lp, self.eval_ref.get(kind, idx), **loss_kwargs(d))))
                m.update(summarize_outputs(outs, "eval/dpo"))
            m.update(evaluate_tasks(self.cfg, self.policy, getattr(self, "eval_tasks", None),
                                    getattr(self, "rewards", None), self.run_dir, self.step))
        finally:
            self.policy.model.train(was_training)
        return m

    # -- checkpoints
    def save(self):
        return save_trainer(self)

    def resume(self) -> bool:
        return resume_trainer(self) is not None


# ----------------------------------------------------------------------------- shared helpers
def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(policy, d):
    params = policy.trainable_parameters()
    if not params:
        raise ValueError("the policy has no trainable parameters (is the LoRA adapter attached?)")
    return torch.optim.AdamW(params, lr=d.learning_rate, weight_decay=d.weight_decay,
                             betas=(d.adam_beta1, d.adam_beta2))


def finish_dpo_step(trainer, outs: list, step: int, t0: float) -> dict:
    """The end of every DPO step: clip, optimizer step, new adapter version, the step's dpo/* metrics."""
    norm = clip_and_step(trainer.policy, trainer.optimizer, trainer.d.max_grad_norm)
    trainer.policy.version += 1
    trainer.step = step
    return {**summarize_outputs(outs, "dpo"), "grad_norm": norm, "time/update": time.perf_counter() - t0}


def clip_and_step(policy, optimizer, max_grad_norm: float) -> float:
    params = policy.trainable_parameters()
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    return float(norm)


def summarize_outputs(outs: list[tuple[str, DPOOutput]], prefix: str) -> dict:
    """dpo/* metrics over all pairs, plus dpo/<kind>/accuracy per pair kind when both are present."""
    if not outs:
        return {}
    merged = DPOOutput(*(torch.cat([getattr(o, f).detach().float().cpu() for _, o in outs])
                         for f in ("losses", "chosen_rewards", "rejected_rewards")))
    m = dpo_metrics(merged, prefix)
    m[f"{prefix}/pairs"] = len(merged.losses)
    kinds = {k for k, _ in outs}
    for kind in kinds:
        sel = [o for k, o in outs if k == kind]
        cr = torch.cat([o.chosen_rewards.float().cpu() for o in sel])
        rr = torch.cat([o.rejected_rewards.float().cpu() for o in sel])
        m[f"{prefix}/{kind}/accuracy"] = preference_accuracy(cr, rr).mean().item()
        m[f"{prefix}/{kind}/margin"] = (cr - rr).mean().item()
    return m


def build_eval_tasks(cfg, policy):
    """The config's tasks (image_task / text_task), if any, for sampling at evaluation time."""
    if cfg.image_task is None and cfg.text_task is None:
        return None
    from .tasks import build_tasks
    return build_tasks(cfg, policy.image_size)


@torch.no_grad()
def evaluate_tasks(cfg, policy, tasks, rewards, run_dir: Path, step: int) -> dict:
    """What DPO is ultimately for: the reward of what the policy *generates* (e.g. how red "a red
    image" comes out), next to the held-out preference accuracy (`rl.evaluate`)."""
    from ..rollouts.worker import RolloutWorker
    from .evaluate import eval_requests, evaluate_samples

    n = cfg.dpo.eval_samples_per_prompt
    if not tasks or rewards is None or n <= 0:
        return {}
    worker = RolloutWorker(policy, cfg.rollout, cfg.seed, shares_learner_policy=True)
    grid = run_dir / "eval_samples" / f"step_{step:06d}.png" if cfg.logging.image_grid_every else None
    return evaluate_samples(worker, eval_requests(tasks, n), rewards, policy, step, grid)


def run_summary(history: list[tuple[int, dict]], train_keys=("dpo/loss", "dpo/accuracy")) -> dict:
    """First vs last evaluation of every eval/* metric, first vs last 10% of steps for training ones."""
    out = {"steps": history[-1][0] if history else 0}
    evals = [(s, m) for s, m in history if any(k.startswith("eval/") for k in m)]
    keys = sorted({k for _, m in evals for k in m if k.startswith("eval/") and not k.endswith("/pairs")})
    for k in keys:
        vals = [(s, m[k]) for s, m in evals if m.get(k) is not None and not _isnan(m[k])]
        if vals:
            out[k] = {"initial": vals[0][1], "final": vals[-1][1], "initial_step": vals[0][0],
                      "final_step": vals[-1][0]}
    train = [m for _, m in history if "dpo/loss" in m]
    if train:
        k = max(1, len(train) // 10)
        for key in train_keys:
            first = [m[key] for m in train[:k] if key in m]
            last = [m[key] for m in train[-k:] if key in m]
            if first and last:
                out[key] = {"first_10pct": float(np.mean(first)), "last_10pct": float(np.mean(last))}
    return out


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def run_loop(trainer, cfg, max_steps: int, desc: str, on_start=None) -> dict:
    """The shared outer loop of dpo and online_dpo: resume, evaluate, train, log, checkpoint."""
    from tqdm.auto import tqdm

    from .checkpoint import latest_checkpoint
    from .config import save_config
    from .runlog import RunLogger

    run_dir = Path(cfg.output_dir)
    save_config(cfg, run_dir / "config.yaml")
    logger = RunLogger(run_dir, tensorboard=cfg.logging.tensorboard)
    history: list[tuple[int, dict]] = []
    if getattr(trainer, "resume_requested", False) and trainer.resume():
        logger.truncate_after(trainer.step)
        print(f"resumed from step {trainer.step} ({latest_checkpoint(run_dir)})")
        history = [(r["step"], r) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                   if r] if (run_dir / "metrics.jsonl").exists() else []
    d = cfg.dpo
    if trainer.step == 0:
        m = {**(on_start() if on_start else {}), **trainer.evaluate()}
        logger.log(0, m)
        history.append((0, m))
    bar = tqdm(total=max_steps, initial=trainer.step, desc=desc, disable=not cfg.logging.progress_bar,
               dynamic_ncols=True)
    try:
        while trainer.step < max_steps:
            m = trainer.train_step()
            step = trainer.step
            last = step == max_steps
            if (d.eval_steps and step % d.eval_steps == 0) or last:
                m.update(trainer.evaluate())
            if step % cfg.logging.log_every == 0 or last or any(k.startswith("eval/") for k in m):
                logger.log(step, m)
            history.append((step, m))
            if (cfg.logging.save_every and step % cfg.logging.save_every == 0) or last:
                trainer.save()
            bar.update(1)
            post = {k.split("/")[-1]: f"{v:.3f}" for k, v in m.items()
                    if k in ("dpo/loss", "dpo/accuracy", "eval/dpo/accuracy") and isinstance(v, float)}
            bar.set_postfix(post)
    finally:
        bar.close()
        logger.close()
        rewards = getattr(trainer, "rewards", None)
        if rewards is not None:
            rewards.close()
    summary = run_summary(history)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary  # `uniloop train` prints it


@register_algorithm("dpo")
def train_dpo(cfg, resume: bool = False) -> dict:
    """`algorithm: dpo`: offline DPO on the pairs of `preference_data`."""
    if cfg.dpo is None:
        from .config import DPOConfig
        cfg.dpo = DPOConfig()
    trainer = DPOTrainer(cfg)
    trainer.resume_requested = resume
    trainer.setup_data()
    trainer.eval_tasks = build_eval_tasks(cfg, trainer.policy)
    if cfg.rewards:
        from .trainer import build_rewards
        trainer.rewards = build_rewards(cfg, trainer.run_dir)
    print(f"dpo: {len(trainer.train_set.generation)} generation + {len(trainer.train_set.understanding)} "
          f"understanding training pairs, {len(trainer.eval_set)} held out")
    return run_loop(trainer, cfg, cfg.dpo.max_steps, "dpo", on_start=lambda: dict(trainer.data_info))
