"""Janus / Janus-Pro as an RL policy: sampling with log-probs, teacher forcing, LoRA, decode.

HF `generate(generation_mode="image")` returns tokens only, so image sampling is written here:
a KV-cached decode over the doubled classifier-free-guidance batch, recording for every sampled
token its log-prob under the guided distribution (what was sampled from) and under the conditional
branch alone. Teacher forcing recomputes either with gradients; on the same weights the two agree
to float precision, which is what makes the first PPO/GRPO ratio exactly 1. In half precision the
generation head, the CFG mixing and the log-softmax run in float32 (`sampling.generation_logits`) and
a CPU model loads with eager attention (`sampling.default_attention`): there the two agree bit for
bit in bf16 too. Elsewhere (SDPA/GPU kernels) they differ by rounding, which the learner measures and
corrects every step (grpo.vllm_importance_sampling_*, README 'Sampler/learner mismatch').

Randomness is drawn per sample from a seed the caller gives (see `rollouts.worker.sample_seed`)
and turned into tokens by inverse-CDF sampling, so a sample's tokens do not depend on which batch,
worker or device it was drawn in.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .batches import ImageRollout, ReasonedImageRollout, TextRollout
from .fast_sampler import choose_sampler, fast_sampler_for
from .peft_policy import PeftPolicy, fingerprint
from .reasoning import ReasoningSampler, reasoned_logprobs
from .sampling import (cache_kwargs, default_attention, entropy_of, filter_top_k, generation_logits, guided_logits,
                       inverse_cdf_sample, positions_from_mask, resolve_dtype, selective_log_softmax, uniforms_for)

LORA_TARGET_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"

class JanusPolicy(ReasoningSampler, PeftPolicy):
    """A Janus checkpoint (hub id or local directory) wrapped for RL."""

    modalities = ("image", "text")  # generates images and answers questions about them

    def __init__(self, model, processor, device="cpu", dtype=torch.float32):
        self.model = model  # JanusForConditionalGeneration, or a PeftModel around it
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.version = 0  # adapter version, bumped by whoever loads new adapter weights

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype="float32", device="cpu",
                        quantization: str | None = None, attn_implementation: str | None = None):
        """Load by hub id (`deepseek-community/Janus-Pro-1B`) or local directory: one code path."""
        from transformers import JanusForConditionalGeneration, JanusProcessor

        dtype = resolve_dtype(dtype)
        # NF4 for the language model only (a bare "vision_model" would also catch the aligners and the head)
        skip = ["model.vision_model", "model.vqmodel", "model.generation_head", "model.generation_embeddings",
                "model.generation_aligner", "model.aligner", "lm_head"]
        attn = default_attention(dtype, device, attn_implementation)  # eager for bf16 on the CPU: see there
        processor, model = cls.load_frozen(JanusForConditionalGeneration, JanusProcessor, name_or_path, dtype, device,
                                           quantization, attn, skip)
        return cls(model, processor, device=device, dtype=dtype)

    @classmethod
    def prompt_budget(cls, name_or_path) -> tuple:
        """(tokenizer, prompt tokens that fit) from the checkpoint's tokenizer and config alone (no weights
        load): the language model's context minus the image tokens a generation appends."""
        from transformers import AutoTokenizer, JanusConfig

        config = JanusConfig.from_pretrained(str(name_or_path))
        room = config.text_config.max_position_embeddings - config.vision_config.num_image_tokens
        return AutoTokenizer.from_pretrained(str(name_or_path)), room

    # ------------------------------------------------------------------ structure
    janus = PeftPolicy.base  # the JanusForConditionalGeneration inside (adapters, if any, injected in it)

    @property
    def vq_image_size(self) -> int:
        """Pixel size the VQ model encodes/decodes (384 for Janus-Pro, 8 for the tiny model)."""
        vq = self.janus.config.vq_config
        return int(vq.num_patches * 2 ** (len(vq.channel_multiplier) - 1))

    @property
    def codebook_size(self) -> int:
        return int(self.janus.config.vq_config.num_embeddings)

    def vq_weights(self) -> tuple:
        vq = self.janus.model.vqmodel  # the codebook and the encoder's first and last convolutions
        return vq.quantize.embedding.weight, vq.quant_conv.weight, next(vq.encoder.parameters())

    def model_fingerprint(self) -> str:
        """Identifies the base model's image-token scores (with the VQ): cached reference log-probs key."""
        head = self.janus.model.generation_head.state_dict()
        return fingerprint(self.vq_fingerprint(), head[next(iter(head))])

    @property
    def num_image_tokens(self) -> int:
        return self.janus.model.vision_model.config.num_image_tokens

    @property
    def image_size(self) -> int:
        return self.janus.config.vision_config.image_size

    def add_lora(self, r=16, alpha=32, dropout=0.0, target_modules=LORA_TARGET_REGEX, init="gaussian_zero"):
        """LoRA on the language model only (a plain q_proj/v_proj list would also hit SigLIP)."""
        return self.attach_lora(r, alpha, dropout, target_modules)

    # ------------------------------------------------------------------ prompts
    def _chat(self, content, image: bool) -> str:
        if getattr(self.processor, "chat_template", None):
            parts = ([{"type": "image"}] if image else []) + [{"type": "text", "text": content}]
            return self.processor.apply_chat_template(
                [{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=False)
        prefix = "<image_placeholder>\n" if image else ""
        return f"<|User|>: {prefix}{content}\n\n<|Assistant|>:"

    def encode_generation_prompts(self, prompts: list[str]):
        texts = [self._chat(p, image=False) for p in prompts]
        enc = self.processor(text=texts, generation_mode="image", padding=True, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def unconditional_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """CFG's unconditional prompt: every token but BOS and <begin_of_image> becomes pad."""
        tok = self.tokenizer
        keep = (ids == tok.bos_token_id) | (ids == tok.convert_tokens_to_ids(tok.boi_token))
        return ids.masked_fill(~keep, tok.pad_token_id)

    # ------------------------------------------------------------------ images
    def _embed(self, ids):
        return self.janus.get_input_embeddings()(ids)

    def _image_token_embeds(self, tokens):
        return self.janus.prepare_embeddings_for_image_generation(tokens)

    def _lm(self, **kw):
        return self.janus.model.language_model(**kw)

    @torch.no_grad()
    def sample_images(self, prompts: list[str], seeds: list[int], cfg_scale: float = 5.0,
                      temperature: float = 1.0, top_k: int = 0, group_ids=None, targets=None,
                      decode: bool = True, sampler: str = "auto") -> ImageRollout:
        """One image per entry of `prompts` (repeat a prompt for a group), seeded per sample.

        temperature 0 = greedy. `cfg_scale <= 1` runs the conditional branch alone.
        `sampler`: "auto" (fast static-cache/CUDA-graph sampler on CUDA, plain loop elsewhere),
        "plain" or "fast" (policies/fast_sampler.py): the same computation (bit-identical on CPU and
        in float32; in bf16 on a GPU, kernel rounding makes samples drift apart after ~100 tokens)."""
        B = len(prompts)
        ids, mask = self.encode_generation_prompts(prompts)
        if choose_sampler(sampler, self.device) == "fast":
            tokens, lp_cfg, lp_cond, ent = fast_sampler_for(self).sample(ids, mask, seeds, cfg_scale, temperature,
                                                                          top_k)
        else:
            tokens, lp_cfg, lp_cond, ent = self._sample_tokens_plain(ids, mask, seeds, cfg_scale, temperature, top_k)
        images = self.decode(tokens) if decode else torch.zeros(B, 0, 0, 3)
        return ImageRollout(
            prompts=list(prompts), prompt_ids=ids.cpu(), prompt_mask=mask.cpu(), image_tokens=tokens.cpu(),
            logprobs_cfg=lp_cfg.cpu(), logprobs_cond=lp_cond.cpu(), images=images.cpu(), entropy=ent.cpu(),
            group_ids=torch.as_tensor(group_ids if group_ids is not None else range(B)).long(),
            targets=list(targets or []), version=self.version, cfg_scale=float(cfg_scale),
            temperature=float(temperature), top_k=int(top_k))

    def _sample_tokens_plain(self, ids, mask, seeds, cfg_scale, temperature, top_k):
        """The reference sampler: transformers' language model step by step with a DynamicCache."""
        from transformers import DynamicCache

        B, T = ids.shape[0], self.num_image_tokens
        use_cfg = cfg_scale > 1.0
        if use_cfg:
            ids2, mask2 = torch.cat([ids, self.unconditional_ids(ids)]), mask.repeat(2, 1)
        else:
            ids2, mask2 = ids, mask
        u = uniforms_for(seeds, T, self.device) if temperature > 0 else None
        tokens = torch.empty(B, T, dtype=torch.long, device=self.device)
        lp_cfg = torch.empty(B, T, dtype=torch.float32, device=self.device)
        lp_cond = torch.empty_like(lp_cfg)
        ent = torch.empty_like(lp_cfg)
        cache = DynamicCache()
        pos = positions_from_mask(mask2)
        out = self._lm(inputs_embeds=self._embed(ids2), attention_mask=mask2, position_ids=pos,
                       use_cache=True, **cache_kwargs(cache))
        next_pos = pos[:, -1:] + 1
        for t in range(T):
            logits = generation_logits(self.janus.model.generation_head, out.last_hidden_state[:, -1])
            cond, uncond = (logits[:B], logits[B:]) if use_cfg else (logits, None)
            temp = temperature if temperature > 0 else 1.0
            guided = F.log_softmax(filter_top_k(guided_logits(cond, uncond, cfg_scale) / temp, top_k), -1)
            tok = inverse_cdf_sample(guided, u[:, t]) if u is not None else guided.argmax(-1)
            tokens[:, t] = tok
            lp_cfg[:, t] = guided.gather(-1, tok[:, None]).squeeze(-1)
            lp_cond[:, t] = F.log_softmax(cond / temp, -1).gather(-1, tok[:, None]).squeeze(-1)
            ent[:, t] = entropy_of(guided)
            if t == T - 1:
                break
            step_tok = torch.cat([tok, tok]) if use_cfg else tok
            mask2 = torch.cat([mask2, mask2.new_ones(mask2.shape[0], 1)], 1)
            out = self._lm(inputs_embeds=self._image_token_embeds(step_tok[:, None]), attention_mask=mask2,
                           position_ids=next_pos, use_cache=True, **cache_kwargs(cache))
            next_pos = next_pos + 1
        return tokens, lp_cfg, lp_cond, ent

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """VQ tokens (B, T) -> images (B, H, W, 3) in [0, 1]."""
        outs = []
        for i in range(0, tokens.shape[0], chunk):
            px = self.janus.decode_image_tokens(tokens[i:i + chunk].to(self.device))
            outs.append(((px.float() + 1) / 2).clamp_(0, 1))
        return torch.cat(outs)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, H, W, 3) in [0, 1] at the VQ resolution -> VQ tokens (B, T)."""
        px = (images.permute(0, 3, 1, 2).to(self.device, self.dtype) * 2 - 1)
        return self.janus.model.vqmodel.encode(px).image_tokens.view(images.shape[0], -1)

    def image_logprobs(self, prompt_ids, prompt_mask, image_tokens, mode: str = "cfg", cfg_scale: float = 5.0,
                       temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
        """Teacher-forced log-probs (B, T) of `image_tokens`, with gradients.

        mode "conditional": the conditional branch only (T2I-R1 style);
        mode "cfg": the guided distribution u + s(c - u), i.e. what CFG sampling draws from.
        """
        if mode not in ("cfg", "conditional"):
            raise ValueError(f"logprob mode must be 'cfg' or 'conditional', got {mode!r}")
        ids, mask, tokens = prompt_ids.to(self.device), prompt_mask.to(self.device), image_tokens.to(self.device)
        B, L = ids.shape
        use_cfg = mode == "cfg" and cfg_scale > 1.0
        if use_cfg:
            ids, mask, tokens = torch.cat([ids, self.unconditional_ids(ids)]), mask.repeat(2, 1), tokens.repeat(2, 1)
        embeds = torch.cat([self._embed(ids), self._image_token_embeds(tokens[:, :-1])], 1)
        full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], tokens.shape[1] - 1)], 1)
        h = self._lm(inputs_embeds=embeds, attention_mask=full_mask,
                     position_ids=positions_from_mask(full_mask), use_cache=False).last_hidden_state
        logits = generation_logits(self.janus.model.generation_head, h[:, L - 1:])
        temp = temperature if temperature > 0 else 1.0
        if use_cfg:
            logits = filter_top_k(guided_logits(logits[:B], logits[B:], cfg_scale) / temp, top_k)
        else:
            logits = logits / temp
            if mode == "cfg":  # cfg mode without guidance: the sampler still applied top-k
                logits = filter_top_k(logits, top_k)
        return selective_log_softmax(logits, tokens[:B])

    def rollout_logprobs(self, batch: ImageRollout | TextRollout, mode: str = "cfg") -> torch.Tensor:
        """Teacher-forced log-probs for a rollout batch, aligned with `batch.logprobs(mode)` (a reasoned
        rollout: the plan's columns, then the image's; `batch.segments` / `completion_mask` mask them)."""
        if isinstance(batch, ReasonedImageRollout):
            return reasoned_logprobs(self, batch, mode)
        if isinstance(batch, ImageRollout):
            return self.image_logprobs(batch.prompt_ids, batch.prompt_mask, batch.image_tokens, mode=mode,
                                       cfg_scale=batch.cfg_scale, temperature=batch.temperature, top_k=batch.top_k)
        return self.text_logprobs(batch)

    # ------------------------------------------------------------------ understanding
    def encode_questions(self, images: torch.Tensor, questions: list[str]):
        texts = [self._chat(q, image=True) for q in questions]
        pix = [(im.clamp(0, 1) * 255).round().to(torch.uint8).permute(2, 0, 1).cpu() for im in images]
        enc = self.processor(text=texts, images=pix, padding=True, return_tensors="pt")
        return (enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device),
                enc["pixel_values"].to(self.device, self.dtype))

    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions: list[str], seeds: list[int], max_new_tokens: int = 16,
               temperature: float = 1.0, group_ids=None, targets=None) -> TextRollout:
        """Sample one answer per (image, question) with per-token log-probs. temperature 0 = greedy."""
        B = len(questions)
        ids, mask, pixel_values = self.encode_questions(images, questions)
        answer, amask, lps, ent = self._sample_text(ids, mask, pixel_values, seeds, max_new_tokens, temperature)
        return TextRollout(
            prompts=list(questions), images=images.cpu().float(), prompt_ids=ids.cpu(), prompt_mask=mask.cpu(),
            pixel_values=pixel_values.cpu(), answer_ids=answer.cpu(), answer_mask=amask.cpu(),
            logprobs_sampled=lps.cpu(), entropy=ent.cpu(), answers=self._decode_text(answer, amask),
            group_ids=torch.as_tensor(group_ids if group_ids is not None else range(B)).long(),
            targets=list(targets or []), version=self.version, temperature=float(temperature))

    def _decode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        texts = self.tokenizer.batch_decode(ids.masked_fill(mask == 0, self.tokenizer.pad_token_id),
                                            skip_special_tokens=True)
        return [t.strip() for t in texts]

    def _sample_text(self, ids, mask, pixel_values, seeds, max_new_tokens: int, temperature: float, stop_ids=()):
        """KV-cached text sampling after a left-padded prompt (with an image when `pixel_values` is given):
        (tokens, mask, log-probs, entropies), each (B, max_new_tokens), right-padded. A row ends at EOS
        or at any of `stop_ids` (the stop token is kept: it was sampled and is trained)."""
        from transformers import DynamicCache

        B = ids.shape[0]
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        stops = torch.tensor(sorted({eos, *stop_ids}), device=self.device)
        u = uniforms_for(seeds, max_new_tokens, self.device) if temperature > 0 else None
        cache = DynamicCache()
        pos = positions_from_mask(mask)
        image = {"pixel_values": pixel_values} if pixel_values is not None else {}
        out = self.janus(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **image,
                         **cache_kwargs(cache), logits_to_keep=1)
        answer = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=self.device)
        amask = torch.zeros(B, max_new_tokens, dtype=torch.long, device=self.device)
        lps = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=self.device)
        ent = torch.zeros_like(lps)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        next_pos, cur_mask = pos[:, -1:] + 1, mask
        for t in range(max_new_tokens):
            logp = F.log_softmax(self._suppress_specials(out.logits[:, -1].float())
                                 / (temperature if temperature > 0 else 1.0), -1)
            tok = inverse_cdf_sample(logp, u[:, t]) if u is not None else logp.argmax(-1)
            tok = tok.masked_fill(done, pad)
            answer[:, t] = tok
            amask[:, t] = (~done).long()
            lps[:, t] = logp.gather(-1, tok[:, None]).squeeze(-1).masked_fill(done, 0.0)
            ent[:, t] = entropy_of(logp).masked_fill(done, 0.0)
            done = done | torch.isin(tok, stops)
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            cur_mask = torch.cat([cur_mask, cur_mask.new_ones(B, 1)], 1)
            out = self.janus(input_ids=tok[:, None], attention_mask=cur_mask, position_ids=next_pos,
                             use_cache=True, **cache_kwargs(cache))
            next_pos = next_pos + 1
        return answer, amask, lps, ent

    def _suppress_specials(self, logits: torch.Tensor) -> torch.Tensor:
        """Answers may end with EOS but never contain other special tokens (an image placeholder in
        an answer would break the next teacher-forced pass); sampling and teacher forcing both apply it."""
        if not hasattr(self, "_special_ids"):
            ids = set(self.tokenizer.all_special_ids) | {self.janus.config.image_token_id}
            ids.discard(self.tokenizer.eos_token_id)
            self._special_ids = torch.tensor(sorted(i for i in ids if i is not None and i < logits.shape[-1]))
        logits = logits.clone()
        logits[..., self._special_ids.to(logits.device)] = float("-inf")
        return logits

    def text_logprobs(self, batch: TextRollout) -> torch.Tensor:
        """Teacher-forced log-probs (B, A) of the answer tokens, with gradients (0 where masked)."""
        return self._continuation_logprobs(batch.prompt_ids, batch.prompt_mask, batch.answer_ids, batch.answer_mask,
                                           batch.pixel_values, batch.temperature)

    def _continuation_logprobs(self, prompt_ids, prompt_mask, ids, amask, pixel_values, temperature: float):
        """Teacher-forced log-probs (B, A) of the text `ids` after a left-padded prompt (0 where masked)."""
        full = torch.cat([prompt_ids, ids], 1).to(self.device)
        mask = torch.cat([prompt_mask, amask], 1).to(self.device)
        L, A = prompt_ids.shape[1], ids.shape[1]
        image = {"pixel_values": pixel_values.to(self.device, self.dtype)} if pixel_values is not None else {}
        out = self.janus(input_ids=full, attention_mask=mask, position_ids=positions_from_mask(mask),
                         use_cache=False, **image)
        temp = temperature if temperature > 0 else 1.0
        logits = self._suppress_specials(out.logits[:, L - 1:L - 1 + A].float()) / temp
        lp = selective_log_softmax(logits, ids.to(self.device))
        # where, not a product: a padding position holds a suppressed token whose log-prob is -inf,
        # and -inf * 0 would be NaN (and a NaN loss)
        return torch.where(amask.to(self.device).bool(), lp, torch.zeros((), device=lp.device))

    def yes_probability(self, images: torch.Tensor, questions: list[str], grad: bool = False) -> torch.Tensor:
        """P(yes) / (P(yes) + P(no)) from the first answer token, per (image, question)."""
        yes, no = self.yes_no_ids()
        with torch.set_grad_enabled(grad):
            ids, mask, pixel_values = self.encode_questions(images, questions)
            logits = self.janus(input_ids=ids, pixel_values=pixel_values, attention_mask=mask,
                                position_ids=positions_from_mask(mask), logits_to_keep=1).logits[:, -1].float()
            lse_yes = logits[:, yes].logsumexp(-1)
            lse_no = logits[:, no].logsumexp(-1)
            return torch.sigmoid(lse_yes - lse_no)
