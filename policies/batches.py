"""Every typed batch that flows policies -> rollouts -> rewards -> rl, in one module.

- Rollouts: `ImageRollout` (Janus image tokens), `ReasonedImageRollout` (a text plan, then the image
  conditioned on prompt + plan: one trajectory, two segments), `TextRollout` (answers), `FlowRollout`
  (a flow-matching trajectory). A rollout carries everything the learner needs to recompute log-probs
  (token ids, masks, latents), everything rewards need to score it (prompts, pixels, answer text),
  and the bookkeeping that makes distributed sampling checkable (adapter version, group ids).
- Scores: `RewardOutput` (one reward's per-sample scores and validity) and `ScoredBatch` (a rollout
  with its mixed reward, components and, once the learner sets them, advantages and log-probs).
- Preference pairs: `GenerationPair`, `UnderstandingPair` (token/answer pairs for DPO) and
  `LatentPairs` (image latents for Diffusion-DPO).

Every field is declared on its dataclass; nothing is attached after construction.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


def _cat(values):
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values)
    if isinstance(values[0], list):
        return [x for v in values for x in v]
    return values[0]


class _Batch:
    """Shared helpers: length, row selection, concatenation, device moves."""

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index):
        """Rows `index` (a list of ints or a bool/long tensor) as a new batch of the same type."""
        if isinstance(index, torch.Tensor):
            index = index.nonzero().flatten().tolist() if index.dtype == torch.bool else index.tolist()
        index = list(index)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == len(self):
                out[f.name] = v[index]
            elif isinstance(v, list) and len(v) == len(self):
                out[f.name] = [v[i] for i in index]
            else:
                out[f.name] = v
        return type(self)(**out)

    @classmethod
    def concat(cls, batches):
        """Concatenate batches row-wise; token batches are re-padded to a common length first."""
        batches = [b for b in batches if len(b)] or batches[:1]
        batches = cls._align(batches)
        return cls(**{f.name: _cat([getattr(b, f.name) for b in batches]) for f in fields(cls)})

    @classmethod
    def _align(cls, batches):
        """Pad the batches' variable-length fields to a common width (none by default)."""
        return batches

    def to(self, device):
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


@dataclass
class ImageRollout(_Batch):
    """prompt -> image samples from an autoregressive image-token policy (Janus).

    `logprobs` are the log-probs of the sampled tokens under the distribution selected by
    `logprob_mode` at sampling time ("cfg": the guided distribution actually sampled from;
    "conditional": the conditional branch only). Both are recorded so either mode can be trained.
    """

    prompts: list[str]
    prompt_ids: torch.Tensor  # (B, L) left-padded prompt ending in <begin_of_image>
    prompt_mask: torch.Tensor  # (B, L) 1 = real token
    image_tokens: torch.Tensor  # (B, T) VQ codebook ids
    logprobs_cfg: torch.Tensor  # (B, T) log-prob under the guided (sampled-from) distribution
    logprobs_cond: torch.Tensor  # (B, T) log-prob under the conditional branch
    images: torch.Tensor  # (B, H, W, 3) float in [0, 1]
    group_ids: torch.Tensor  # (B,) samples of one prompt share a group id
    targets: list[str] = field(default_factory=list)  # optional per-sample ground truth (e.g. color)
    version: int = 0  # adapter version the samples were drawn with
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    entropy: torch.Tensor | None = None  # (B, T) entropy of the distribution each token was drawn from

    kind = "image"

    @classmethod
    def _align(cls, batches):
        return _pad_prompts(batches)

    def logprobs(self, mode: str) -> torch.Tensor:
        return self.logprobs_cfg if mode == "cfg" else self.logprobs_cond

    @property
    def completion_mask(self) -> torch.Tensor:
        # Image sequences have a fixed length: every token counts.
        return torch.ones_like(self.image_tokens, dtype=torch.float32)

    @property
    def segments(self) -> dict[str, slice]:
        """Columns of `logprobs(mode)` / `completion_mask` per loss segment (aggregated and weighted apart)."""
        return {"image": slice(0, self.image_tokens.shape[1])}

    def segment_entropy(self) -> dict[str, tuple]:
        """segment -> (entropy, mask) of the sampled tokens' distributions (health metrics)."""
        ones = torch.ones_like(self.image_tokens, dtype=torch.float32)  # not completion_mask: a subclass adds a plan
        return {"image": (self.entropy, ones)} if self.entropy is not None else {}


@dataclass(kw_only=True)
class ReasonedImageRollout(ImageRollout):
    """prompt -> plan (text) -> image: T2I-R1's semantic-level chain of thought, one trajectory.

    The plan is sampled first from `plan_prompt_ids` (the instruction template around the prompt);
    the image is then sampled from `prompt_ids` (the generation prompt built from prompt + plan text,
    ending in <begin_of_image>), so every inherited image field means what it means on an
    ImageRollout and every image reward scores it unchanged. `logprobs(mode)` and `completion_mask`
    are the plan's columns followed by the image's (`segments` says which are which); rewards read
    `plans` (the decoded plan texts) beside `prompts` and `images`.
    """

    plan_prompt_ids: torch.Tensor  # (B, Lp) left-padded instruction prompt
    plan_prompt_mask: torch.Tensor  # (B, Lp)
    plan_ids: torch.Tensor  # (B, P) right-padded sampled plan tokens
    plan_mask: torch.Tensor  # (B, P) 1 = real plan token (up to and including the stop token)
    plan_logprobs: torch.Tensor  # (B, P) log-probs of the sampled plan tokens (0 where masked)
    plans: list[str]  # decoded plans
    plan_entropy: torch.Tensor  # (B, P) entropy of each plan token's distribution (0 where masked)
    plan_temperature: float = 1.0

    @classmethod
    def _align(cls, batches):
        batches = _pad_prompts(batches)
        Lp = max(b.plan_prompt_ids.shape[1] for b in batches)
        P = max(b.plan_ids.shape[1] for b in batches)
        out = []
        for b in batches:
            b = replace(b, **_left_pad_pair(b.plan_prompt_ids, b.plan_prompt_mask, Lp, "plan_prompt"))
            out.append(replace(b, **_right_pad_fields(b, P, "plan_mask", {"plan_ids": None, "plan_logprobs": 0.0,
                                                                         "plan_entropy": 0.0})))
        return out

    def logprobs(self, mode: str) -> torch.Tensor:
        return torch.cat([self.plan_logprobs, super().logprobs(mode)], 1)

    @property
    def completion_mask(self) -> torch.Tensor:
        return torch.cat([self.plan_mask.float(), torch.ones_like(self.image_tokens, dtype=torch.float32)], 1)

    @property
    def segments(self) -> dict[str, slice]:
        P = self.plan_ids.shape[1]
        return {"plan": slice(0, P), "image": slice(P, P + self.image_tokens.shape[1])}

    def segment_entropy(self) -> dict[str, tuple]:
        return {"plan": (self.plan_entropy, self.plan_mask.float()), **super().segment_entropy()}


@dataclass
class TextRollout(_Batch):
    """(image, question) -> answer samples from the policy's understanding side."""

    prompts: list[str]  # the questions
    images: torch.Tensor  # (B, H, W, 3) float in [0, 1], the images asked about
    prompt_ids: torch.Tensor  # (B, L) left-padded prompt incl. the expanded image placeholder
    prompt_mask: torch.Tensor  # (B, L)
    pixel_values: torch.Tensor  # (B, 3, h, w) processor output for the vision tower
    answer_ids: torch.Tensor  # (B, A) right-padded sampled answer tokens
    answer_mask: torch.Tensor  # (B, A) 1 = real answer token (up to and including EOS)
    logprobs_sampled: torch.Tensor  # (B, A) log-probs of the sampled tokens (0 where masked)
    answers: list[str]  # decoded answers
    group_ids: torch.Tensor  # (B,)
    targets: list[str] = field(default_factory=list)  # reference answers, for rule rewards
    version: int = 0
    temperature: float = 1.0
    entropy: torch.Tensor | None = None  # (B, A) entropy of each answer token's distribution (0 where masked)

    kind = "text"

    @classmethod
    def _align(cls, batches):
        width = max(b.answer_ids.shape[1] for b in batches)
        return [_right_pad_answers(b, width) for b in _pad_prompts(batches)]

    def logprobs(self, mode: str = "cfg") -> torch.Tensor:
        return self.logprobs_sampled

    @property
    def completion_mask(self) -> torch.Tensor:
        return self.answer_mask.float()

    @property
    def segments(self) -> dict[str, slice]:
        return {"text": slice(0, self.answer_ids.shape[1])}

    def segment_entropy(self) -> dict[str, tuple]:
        return {"text": (self.entropy, self.completion_mask)} if self.entropy is not None else {}


@dataclass
class FlowRollout(_Batch):
    """prompt -> image samples of a flow-matching policy, with their whole denoising trajectory.

    `latents[:, k]` is the state before step k and `latents[:, k + 1]` the one after it, so the
    transition k can be re-scored by the learner; `logprobs[:, k]` is its log-prob (mean over the
    latent's dimensions) under the policy that sampled it, with the guidance it used.
    """

    prompts: list[str]
    latents: torch.Tensor  # (B, K + 1, C, h, w) float32 trajectory, noise first, final latent last
    sigmas: torch.Tensor  # (B, K + 1) the flow times t of the trajectory (1 ... 0)
    logprobs: torch.Tensor  # (B, K) float32 log-prob of each transition
    images: torch.Tensor  # (B, H, W, 3) float in [0, 1]
    group_ids: torch.Tensor  # (B,) samples of one prompt share a group id
    version: int = 0  # adapter version the samples were drawn with
    cfg_scale: float = 1.0
    noise_level: float = 0.7
    targets: list[str] = field(default_factory=list)  # optional per-sample ground truth (e.g. color)
    sde_type: str = "sde"  # the stochastic step kind: sde | cps | ode (policies/flow_sde.py)
    sde_mask: torch.Tensor | None = None  # (B, K) bool: stochastic transitions (None = all); ODE elsewhere

    kind = "image"

    @property
    def num_steps(self) -> int:
        return self.logprobs.shape[1]

    def stochastic_steps(self) -> torch.Tensor:
        """(B, K) bool: the transitions that were sampled stochastically (the trainable ones)."""
        if self.sde_mask is not None:
            return self.sde_mask
        return torch.full(self.logprobs.shape, self.sde_type != "ode", dtype=torch.bool)


Rollout = ImageRollout | ReasonedImageRollout | TextRollout | FlowRollout


def _pad_prompts(batches: list) -> list:
    """Left-pad every batch's prompts to the longest prompt among them."""
    L = max(b.prompt_ids.shape[1] for b in batches)
    return [_left_pad(b, L) for b in batches]


def _left_pad(b, L: int):
    """Left-pad a batch's prompt ids/mask to length L (prompts are left-padded: they end where the
    sampled part begins)."""
    if L == b.prompt_ids.shape[1]:
        return b
    return replace(b, **_left_pad_pair(b.prompt_ids, b.prompt_mask, L, "prompt"))


def _left_pad_pair(ids: torch.Tensor, mask: torch.Tensor, L: int, name: str) -> dict:
    """{name_ids, name_mask} left-padded to length L with the pad id the ids already use."""
    extra = L - ids.shape[1]
    if extra > 0:
        pad_id = int(ids[mask == 0][0]) if (mask == 0).any() else 0
        ids = torch.cat([ids.new_full((ids.shape[0], extra), pad_id), ids], 1)
        mask = torch.cat([mask.new_zeros(mask.shape[0], extra), mask], 1)
    return {f"{name}_ids": ids, f"{name}_mask": mask}


def _right_pad_fields(b, A: int, mask_name: str, fills: dict) -> dict:
    """Right-pad the (B, width) fields `fills` (name -> fill value; None = the pad id the ids use) and
    the mask `mask_name` of a batch to width A."""
    mask = getattr(b, mask_name)
    extra = A - mask.shape[1]
    if extra <= 0:
        return {}
    z = lambda t, v: torch.cat([t, t.new_full((t.shape[0], extra), v)], 1)  # noqa: E731
    out = {mask_name: z(mask, 0)}
    for name, fill in fills.items():
        t = getattr(b, name)
        if t is None:
            continue
        if fill is None:
            fill = int(t[mask == 0][0]) if (mask == 0).any() else 0
        out[name] = z(t, fill)
    return out


def _right_pad_answers(b: TextRollout, A: int):
    return replace(b, **_right_pad_fields(b, A, "answer_mask", {"answer_ids": None, "logprobs_sampled": 0.0,
                                                                "entropy": 0.0}))


def concat_rollouts(parts: list):
    """Concatenate rollout batches of one kind (shards or chunks of one step), re-padded as needed."""
    return parts[0] if len(parts) == 1 else type(parts[0]).concat(parts)


# ----------------------------------------------------------------------------- scores
@dataclass
class RewardOutput:
    """One reward's scores of a batch: a float per sample and whether it could be computed."""

    scores: torch.Tensor  # (B,) float; meaningless where ~valid
    valid: torch.Tensor  # (B,) bool
    details: dict[str, list] = field(default_factory=dict)  # optional per-sample extras (judge text...)

    @classmethod
    def from_scores(cls, scores, details=None):
        s = torch.as_tensor(scores, dtype=torch.float32).flatten()
        return cls(scores=s, valid=torch.isfinite(s), details=details or {})


@dataclass
class ScoredBatch:
    """A rollout batch with its rewards: what the sample -> score pipeline returns and the update
    consumes. The learner fills `advantages` (and the log-prob fields it needs) before updating."""

    batch: Rollout
    rewards: torch.Tensor  # (B,) the mixed reward (meaningless where ~valid)
    valid: torch.Tensor  # (B,) bool: every applicable component valid
    components: dict[str, RewardOutput] = field(default_factory=dict)  # reward name -> its raw output
    advantages: torch.Tensor | None = None  # (B,)
    # segment name -> (B,) advantage used for that segment's tokens instead of `advantages`
    # (reasoning.plan_rewards / image_rewards: each segment credited by the rewards it can change)
    segment_advantages: dict[str, torch.Tensor] = field(default_factory=dict)
    old_logprobs: torch.Tensor | None = None  # (B, T) the ratio's denominator when not the current policy
    learner_logprobs: torch.Tensor | None = None  # (B, T) the learner's before the update (a no-grad pass)
    ref_logprobs: torch.Tensor | None = None  # (B, T) under the reference model (KL)
    metrics: dict[str, float] = field(default_factory=dict)  # per-batch statistics (advantage/...)


# ----------------------------------------------------------------------------- preference pairs
GENERATION = "generation"
UNDERSTANDING = "understanding"


class _PairBatch(_Batch):
    """Row selection and concatenation for pair batches: every list/tensor field is per pair."""

    def __len__(self) -> int:
        return len(getattr(self, fields(self)[0].name))


@dataclass
class GenerationPair(_PairBatch):
    """Generation pairs as the policy sees them: prompts and the two images as VQ token ids."""

    prompts: list[str]
    chosen_tokens: torch.Tensor  # (B, T) long
    rejected_tokens: torch.Tensor  # (B, T) long
    meta: list[dict]

    kind = GENERATION


@dataclass
class UnderstandingPair(_PairBatch):
    """Understanding pairs: the image asked about, the question, and the two answers."""

    questions: list[str]
    images: torch.Tensor  # (B, H, W, 3) float in [0, 1] at the understanding resolution
    chosen: list[str]
    rejected: list[str]
    meta: list[dict]
    # Exact answer token ids (as sampled, online DPO); None = tokenise the answer texts.
    chosen_ids: list[list[int]] | None = None
    rejected_ids: list[list[int]] | None = None

    kind = UNDERSTANDING


@dataclass
class LatentPairs(_PairBatch):
    """Generation pairs as a flow model sees them: prompts and the two images' latents."""

    prompts: list[str]
    chosen: torch.Tensor  # (B, C, h, w) latents in the transformer's space
    rejected: torch.Tensor  # (B, C, h, w)
    meta: list[dict]

    kind = GENERATION


PairBatch = GenerationPair | UnderstandingPair | LatentPairs
