"""Emu3 as an RL policy: the `JanusPolicy` protocol for a model whose images are vocabulary tokens.

Emu3 (`Emu3ForConditionalGeneration`) writes an image as ordinary tokens of its one vocabulary.
After the generation prompt `<bos>{text}<|image start|>{h}*{w}<|image token|>` (the processor's
`return_for_image_generation=True`, h and w from `image_area`) the layout is
h rows of (w visual tokens, EOL), then EOF, EOI, EOS (EOL=<|extra_200|>, EOF=<|extra_201|>).

- **Constrained sampling.** The layout is a constraint on the next-token distribution: at a grid
  position only visual tokens are allowed, at a row end only EOL, then EOF/EOI/EOS. Masked logits
  are renormalised: a forced token has log-prob exactly 0, a visual token's log-prob is a
  log-softmax over the visual tokens alone, computed on the visual rows of `lm_head` (the same
  numbers as a -inf mask on the full vocabulary: CFG's `u + s(c - u)` is per token and commutes with
  the mask). Sampler and teacher forcing (`image_logprobs`, `rollout_logprobs`) share
  `constrained_logprobs`. `allowed_tokens(t)` states the constraint on the full vocabulary (also a
  `prefix_allowed_tokens_fn` for HF `generate`; the tests check both against it).
- **Stored tokens.** `ImageRollout.image_tokens` holds only the h*w visual codes as VQ codebook
  indices (row-major), like Janus: forced tokens carry no log-prob and no learning signal, so a loss
  over `image_tokens` sees exactly the sampled decisions, and DPO token data (T ids in
  [0, codebook)) means the same for both families. `layout(codes)` rebuilds the generated sequence
  (vocabulary ids with EOL/EOF/EOI/EOS); `decode` accepts either form.
- **CFG.** Emu3 guides with a negative prompt (`negative_prompt_ids` + `guidance_scale` in HF
  generate): the unconditional branch is a second prompt through the same processor,
  `<bos>{negative text}<|image start|>{h}*{w}<|image token|>`. Here the text is `negative_prompt`
  (default "": the image header alone, the plain unconditional; Emu3's published recipe uses
  `EMU3_NEGATIVE_PROMPT`). Guided logits `u + s(c - u)`, then the constraint, temperature, top-k.
  Mode `conditional` is the conditional branch alone under the same constraint.
- **Understanding.** The processor expands `<image>` into `<|image start|>h*w<|image token|>` +
  h(w+1) placeholders + EOF + EOI; `encode_questions` puts the image's VQ tokens in the placeholders
  (`Emu3Model.get_image_tokens`, as the model's forward does), so `prompt_ids` are self-contained and
  `TextRollout.pixel_values` is an empty (B, 0, 0, 0) placeholder.
- **LoRA** goes on the text model only (`model.text_model.layers.*`), never the VQ model.

Randomness is per sample (seeded uniforms, inverse-CDF sampling, one uniform per visual code), as in
`JanusPolicy`: a sample does not depend on its batch.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .batches import ImageRollout, TextRollout
from .peft_policy import PeftPolicy, fingerprint
from .sampling import (cache_kwargs, filter_top_k, guided_logits, inverse_cdf_sample, positions_from_mask,
                       resolve_dtype, selective_log_softmax, uniforms_for)

LORA_TARGET_REGEX = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj)"
EMU3_NEGATIVE_PROMPT = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
                        "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, "
                        "username, blurry.")
EMU3_DEFAULT_IMAGE_AREA = 518400  # Emu3Processor's default: 720 x 720 px, 90 x 90 codes


def constrained_logprobs(cond, uncond, cfg_scale: float, temperature: float, top_k: int, mode: str):
    """Log-probs over the allowed (visual) tokens, `cond`/`uncond` being logits restricted to them. mode "cfg":
    log_softmax(top_k((u + s(c - u)) / T)), what CFG sampling draws from (`uncond` None = no guidance);
    mode "conditional": log_softmax(c / T)."""
    temp = temperature if temperature > 0 else 1.0
    if mode == "conditional":
        return F.log_softmax(cond / temp, -1)
    return F.log_softmax(filter_top_k(guided_logits(cond, uncond, cfg_scale) / temp, top_k), -1)


def left_pad(ids, mask, length: int, pad_id: int):
    extra = max(0, length - ids.shape[1])
    return (torch.cat([ids.new_full((ids.shape[0], extra), pad_id), ids], 1),
            torch.cat([mask.new_zeros(mask.shape[0], extra), mask], 1))


class Emu3Policy(PeftPolicy):
    """An Emu3 checkpoint (hub id or local directory) wrapped for RL; see the module docstring."""

    modalities = ("image", "text")  # generates images and answers questions about them

    def __init__(self, model, processor, device="cpu", dtype=torch.float32, image_area: int | None = None,
                 negative_prompt: str = ""):
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer  # model: maybe a PeftModel
        self.tokenizer.padding_side = "left"
        self.device, self.dtype, self.version, self.negative_prompt = torch.device(device), dtype, 0, negative_prompt
        self.image_area = int(image_area or getattr(self.emu3.config, "uniloop_image_area", 0)
                              or EMU3_DEFAULT_IMAGE_AREA)
        self.grid = tuple(processor.calculate_generate_size("1:1", self.image_area, processor.downsample_ratio))
        vm = self.emu3.vocabulary_mapping
        self.visual_ids = torch.tensor([vm.img2bpe[k] for k in range(len(vm.img2bpe))], dtype=torch.long)
        self.eol_id = vm.eol_token_id
        self.eof_id, self.eoi_id = self.tokenizer.convert_tokens_to_ids([self.tokenizer.eof_token,
                                                                          self.tokenizer.eoi_token])
        self.eos_id = self.tokenizer.eos_token_id
        h, w = self.grid
        self.grid_index = torch.tensor([r * (w + 1) + c for r in range(h) for c in range(w)])  # in the layout
        lo = int(self.visual_ids[0])
        contiguous = torch.equal(self.visual_ids, torch.arange(lo, lo + len(self.visual_ids)))
        self._visual_rows = slice(lo, lo + len(self.visual_ids)) if contiguous else None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype="float32", device="cpu", quantization: str | None = None,
                        attn_implementation: str | None = None, image_area: int | None = None,
                        negative_prompt: str = ""):
        """Load by hub id (`BAAI/Emu3-Gen-hf`) or local directory: one code path."""
        from transformers import Emu3ForConditionalGeneration, Emu3Processor

        dtype = resolve_dtype(dtype)
        processor, model = cls.load_frozen(Emu3ForConditionalGeneration, Emu3Processor, name_or_path, dtype, device,
                                           quantization, attn_implementation, ["model.vqmodel", "lm_head"])
        return cls(model, processor, device=device, dtype=dtype, image_area=image_area,
                   negative_prompt=negative_prompt)

    @classmethod
    def prompt_budget(cls, name_or_path, image_area: int | None = None) -> tuple:
        """(tokenizer, prompt tokens that fit) from the tokenizer and config alone: the context minus the
        layout of a generated image (h rows of w codes + EOL, then EOF, EOI, EOS; h = w = sqrt(area) / 8)."""
        from transformers import AutoTokenizer, Emu3Config

        config = Emu3Config.from_pretrained(str(name_or_path))
        area = image_area or getattr(config, "uniloop_image_area", 0) or EMU3_DEFAULT_IMAGE_AREA
        side = max(1, round(area ** 0.5 / 8))
        room = config.text_config.max_position_embeddings - (side * (side + 1) + 3)
        return AutoTokenizer.from_pretrained(str(name_or_path)), room

    # ------------------------------------------------------------------ structure
    emu3 = PeftPolicy.base  # the Emu3ForConditionalGeneration inside (adapters, if any, injected in it)
    language_model_path = "model.text_model"

    vq_image_size = property(lambda self: self.image_size)  # the VQ encodes images of the generated size

    @property
    def codebook_size(self) -> int:
        return int(self.emu3.config.vq_config.codebook_size)

    def vq_weights(self) -> tuple:
        vq = self.emu3.model.vqmodel
        return vq.quantize.embedding.weight, vq.quant_conv.conv.weight

    def model_fingerprint(self) -> str:
        return fingerprint(self.vq_fingerprint(), self.emu3.lm_head.weight[self.visual_ids[:8]])

    @property
    def num_image_tokens(self) -> int:
        """Visual codes per image (h * w): the length of `ImageRollout.image_tokens`."""
        return self.grid[0] * self.grid[1]

    @property
    def image_size(self) -> int:
        """Side in pixels of a generated image (the grid is square: ratio 1:1)."""
        return self.grid[0] * self.emu3.model.vqmodel.spatial_scale_factor

    @property
    def layout_length(self) -> int:
        h, w = self.grid
        return h * (w + 1) + 3

    def add_lora(self, r=16, alpha=32, dropout=0.0, target_modules=LORA_TARGET_REGEX, init="gaussian_zero"):
        """LoRA on the text model only. A Janus-style regex (`.*language_model.*...`) is read as the same
        modules of Emu3's `text_model`; a list of names is restricted to it."""
        if isinstance(target_modules, str):
            target_modules = target_modules.replace("language_model", "text_model")
        else:
            target_modules = r".*text_model.*\.(" + "|".join(target_modules) + ")"
        return self.attach_lora(r, alpha, dropout, target_modules)

    # ------------------------------------------------------------------ the layout constraint
    def allowed_tokens(self, t: int) -> list[int]:
        """Vocabulary ids allowed at offset t after the prompt (the constraint on the full vocabulary)."""
        h, w = self.grid
        if t < h * (w + 1):
            return [self.eol_id] if t % (w + 1) == w else self.visual_ids.tolist()
        return [[self.eof_id, self.eoi_id, self.eos_id][min(t - h * (w + 1), 2)]]

    def layout(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h*w) -> the full generated sequence (B, h(w+1)+3): rows + EOL, EOF, EOI, EOS."""
        h, w = self.grid
        B = codes.shape[0]
        rows = self.visual_ids.to(codes.device)[codes.long()].view(B, h, w)
        rows = torch.cat([rows, rows.new_full((B, h, 1), self.eol_id)], 2).view(B, -1)
        tail = torch.tensor([self.eof_id, self.eoi_id, self.eos_id], device=codes.device).expand(B, 3)
        return torch.cat([rows, tail], 1)

    def codes_from_layout(self, layout: torch.Tensor) -> torch.Tensor:
        lut = torch.full((int(self.visual_ids.max()) + 1,), -1, dtype=torch.long)
        lut[self.visual_ids] = torch.arange(len(self.visual_ids))
        codes = lut.to(layout.device)[layout[:, self.grid_index.to(layout.device)]]
        if (codes < 0).any():
            raise ValueError("a grid position of the layout holds a non-visual token")
        return codes

    def _visual_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head restricted to the visual tokens (a view of its rows when they are contiguous)."""
        W = self.emu3.lm_head.weight
        Wv = W[self._visual_rows] if self._visual_rows is not None else W[self.visual_ids.to(W.device)]
        return F.linear(hidden.to(Wv.dtype), Wv).float()

    # ------------------------------------------------------------------ prompts
    def encode_generation_prompts(self, prompts: list[str]):
        enc = self.processor(text=list(prompts), return_for_image_generation=True, image_area=self.image_area,
                             padding=True, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def cfg_inputs(self, ids: torch.Tensor, mask: torch.Tensor):
        """The doubled CFG batch: B conditional rows, then B negative-prompt rows, left-padded alike."""
        if not hasattr(self, "_neg"):
            self._neg = self.encode_generation_prompts([self.negative_prompt])
        neg_ids, neg_mask = (t.to(ids.device) for t in self._neg)
        L, pad = max(ids.shape[1], neg_ids.shape[1]), self.tokenizer.pad_token_id
        ids, mask = left_pad(ids, mask, L, pad)
        neg_ids, neg_mask = left_pad(neg_ids, neg_mask, L, pad)
        B = ids.shape[0]
        return torch.cat([ids, neg_ids.expand(B, L)]), torch.cat([mask, neg_mask.expand(B, L)])

    # ------------------------------------------------------------------ images
    def _lm(self, ids, mask, pos, cache=None):
        kw = cache_kwargs(cache) if cache is not None else {}
        return self.emu3.model.text_model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                          use_cache=cache is not None, **kw).last_hidden_state

    @torch.no_grad()
    def sample_images(self, prompts: list[str], seeds: list[int], cfg_scale: float = 5.0, temperature: float = 1.0,
                      top_k: int = 0, group_ids=None, targets=None, decode: bool = True,
                      sampler: str = "auto") -> ImageRollout:
        """One image per prompt, seeded per sample; temperature 0 = greedy; cfg_scale <= 1 = no CFG.
        `sampler`: "auto" or "plain" (a KV-cached loop; there is no fast sampler for Emu3 yet)."""
        if sampler not in ("auto", "plain"):
            raise ValueError(f"Emu3Policy has only the plain sampler ('auto' or 'plain'), got {sampler!r}")
        B = len(prompts)
        ids, mask = self.encode_generation_prompts(prompts)
        codes, lp_cfg, lp_cond = self._sample_codes(ids, mask, seeds, cfg_scale, temperature, top_k)
        images = self.decode(codes) if decode else torch.zeros(B, 0, 0, 3)
        return ImageRollout(
            prompts=list(prompts), prompt_ids=ids.cpu(), prompt_mask=mask.cpu(), image_tokens=codes.cpu(),
            logprobs_cfg=lp_cfg.cpu(), logprobs_cond=lp_cond.cpu(), images=images.cpu(),
            group_ids=torch.as_tensor(group_ids if group_ids is not None else range(B)).long(),
            targets=list(targets or []), version=self.version, cfg_scale=float(cfg_scale),
            temperature=float(temperature), top_k=int(top_k))

    def _sample_codes(self, ids, mask, seeds, cfg_scale, temperature, top_k):
        """The layout step by step with a DynamicCache: grid positions are sampled from the constrained
        distribution, row ends get EOL (its constrained probability is 1); nothing after the last code is run."""
        from transformers import DynamicCache

        B, (_, w), T = ids.shape[0], self.grid, self.num_image_tokens
        use_cfg = cfg_scale > 1.0
        ids2, mask2 = self.cfg_inputs(ids, mask) if use_cfg else (ids, mask)
        u = uniforms_for(seeds, T, self.device) if temperature > 0 else None
        codes = torch.empty(B, T, dtype=torch.long, device=self.device)
        lp_cfg = torch.empty(B, T, dtype=torch.float32, device=self.device)
        lp_cond = torch.empty_like(lp_cfg)
        vis = self.visual_ids.to(self.device)
        cache, pos = DynamicCache(), positions_from_mask(mask2)
        hidden = self._lm(ids2, mask2, pos, cache)[:, -1]
        next_pos = pos[:, -1:] + 1

        def step(tok):
            nonlocal mask2, next_pos
            mask2 = torch.cat([mask2, mask2.new_ones(mask2.shape[0], 1)], 1)
            out = self._lm(tok[:, None], mask2, next_pos, cache)[:, -1]
            next_pos = next_pos + 1
            return out

        for t in range(T):
            logits = self._visual_logits(hidden)
            cond, uncond = (logits[:B], logits[B:]) if use_cfg else (logits, None)
            guided = constrained_logprobs(cond, uncond, cfg_scale, temperature, top_k, "cfg")
            tok = inverse_cdf_sample(guided, u[:, t]) if u is not None else guided.argmax(-1)
            codes[:, t] = tok
            lp_cfg[:, t] = guided.gather(-1, tok[:, None]).squeeze(-1)
            lp_cond[:, t] = constrained_logprobs(cond, None, 1.0, temperature, 0, "conditional").gather(
                -1, tok[:, None]).squeeze(-1)
            if t == T - 1:
                break
            hidden = step(vis[tok].repeat(2 if use_cfg else 1))
            if t % w == w - 1:  # row end: the constraint allows EOL alone
                hidden = step(torch.full((ids2.shape[0],), self.eol_id, dtype=torch.long, device=self.device))
        return codes, lp_cfg, lp_cond

    def _pixel_stats(self):
        ip = self.processor.image_processor
        return tuple(torch.tensor(v, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
                     for v in (ip.image_mean, ip.image_std))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """Visual codes (B, h*w) or full layouts (B, h(w+1)+3) -> images (B, H, W, 3) in [0, 1]."""
        tokens = tokens.to(self.device).long()
        if tokens.shape[1] == self.layout_length:
            tokens = self.codes_from_layout(tokens)
        (h, w), (mean, std), outs = self.grid, self._pixel_stats(), []
        for i in range(0, tokens.shape[0], chunk):
            px = self.emu3.model.vqmodel.decode(tokens[i:i + chunk].view(-1, h, w)).float()
            outs.append((px * std + mean).clamp_(0, 1).permute(0, 2, 3, 1))
        return torch.cat(outs)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, H, W, 3) in [0, 1] at the generation resolution -> visual codes (B, h*w)."""
        mean, std = self._pixel_stats()
        px = (images.permute(0, 3, 1, 2).to(self.device).float() - mean) / std
        sizes = [[images.shape[1], images.shape[2]]] * images.shape[0]
        out = self.emu3.model.vqmodel.encode(px.to(self.dtype), sizes, return_dict=True)
        return torch.stack(list(out.image_tokens)).view(images.shape[0], -1)

    def image_logprobs(self, prompt_ids, prompt_mask, image_tokens, mode: str = "cfg", cfg_scale: float = 5.0,
                       temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
        """Teacher-forced log-probs (B, h*w) of the visual codes under the constrained distribution, with
        gradients. One forward over prompt + layout (EOLs included) up to the last code."""
        if mode not in ("cfg", "conditional"):
            raise ValueError(f"logprob mode must be 'cfg' or 'conditional', got {mode!r}")
        ids, mask = prompt_ids.to(self.device), prompt_mask.to(self.device)
        codes = image_tokens.to(self.device).long()
        if codes.shape[1] == self.layout_length:
            codes = self.codes_from_layout(codes)
        B = ids.shape[0]
        use_cfg = mode == "cfg" and cfg_scale > 1.0
        if use_cfg:
            ids, mask = self.cfg_inputs(ids, mask)
        L, last = ids.shape[1], int(self.grid_index[-1])
        body = self.layout(codes.repeat(2, 1) if use_cfg else codes)[:, :last]  # inputs before the last code
        full = torch.cat([ids, body], 1)
        full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], last)], 1)
        hs = self._lm(full, full_mask, positions_from_mask(full_mask))
        logits = self._visual_logits(hs[:, L - 1 + self.grid_index.to(self.device)])
        if use_cfg:
            lp = constrained_logprobs(logits[:B], logits[B:], cfg_scale, temperature, top_k, "cfg")
        else:
            lp = constrained_logprobs(logits, None, 1.0, temperature, top_k, mode)
        return lp.gather(-1, codes.unsqueeze(-1)).squeeze(-1)

    def rollout_logprobs(self, batch: ImageRollout | TextRollout, mode: str = "cfg") -> torch.Tensor:
        """Teacher-forced log-probs for a rollout batch, aligned with `batch.logprobs(mode)`."""
        if isinstance(batch, ImageRollout):
            return self.image_logprobs(batch.prompt_ids, batch.prompt_mask, batch.image_tokens, mode=mode,
                                       cfg_scale=batch.cfg_scale, temperature=batch.temperature, top_k=batch.top_k)
        return self.text_logprobs(batch)

    # ------------------------------------------------------------------ understanding
    def _chat(self, question: str) -> str:
        if getattr(self.processor, "chat_template", None):
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return f"You are a helpful assistant. USER: {self.processor.image_token}{question} ASSISTANT:"

    def encode_questions(self, images: torch.Tensor, questions: list[str]):
        """(ids, mask, placeholder): the processor's expansion, with the placeholders replaced by the
        images' VQ tokens (rows + EOL), so the ids alone are the model's input."""
        pix = [(im.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy() for im in images]
        enc = self.processor(text=[self._chat(q) for q in questions], images=pix, padding=True, return_tensors="pt")
        ids = enc["input_ids"].to(self.device)
        with torch.no_grad():
            vq_tokens = self.emu3.model.get_image_tokens(enc["pixel_values"].to(self.device, self.dtype),
                                                         enc["image_sizes"])
        slots = ids == self.processor.image_token_id
        if int(slots.sum()) != vq_tokens.numel():
            raise ValueError(f"{int(slots.sum())} image placeholders but {vq_tokens.numel()} VQ tokens")
        ids = ids.masked_scatter(slots, vq_tokens.to(ids.dtype))
        return ids, enc["attention_mask"].to(self.device), torch.zeros(len(questions), 0, 0, 0)

    def _forward_logits(self, ids, mask, pos, cache=None, keep: int = 0):
        kw = cache_kwargs(cache) if cache is not None else {}
        return self.emu3(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=cache is not None,
                         logits_to_keep=keep, **kw).logits

    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions: list[str], seeds: list[int], max_new_tokens: int = 16,
               temperature: float = 1.0, group_ids=None, targets=None) -> TextRollout:
        """Sample one answer per (image, question) with per-token log-probs. temperature 0 = greedy."""
        from transformers import DynamicCache

        B = len(questions)
        ids, mask, placeholder = self.encode_questions(images, questions)
        eos, pad = self.eos_id, self.tokenizer.pad_token_id
        u = uniforms_for(seeds, max_new_tokens, self.device) if temperature > 0 else None
        cache, pos = DynamicCache(), positions_from_mask(mask)
        logits = self._forward_logits(ids, mask, pos, cache, keep=1)
        answer = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=self.device)
        amask = torch.zeros(B, max_new_tokens, dtype=torch.long, device=self.device)
        lps = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        next_pos, cur_mask = pos[:, -1:] + 1, mask
        for t in range(max_new_tokens):
            logp = F.log_softmax(self._suppress_specials(logits[:, -1].float())
                                 / (temperature if temperature > 0 else 1.0), -1)
            tok = inverse_cdf_sample(logp, u[:, t]) if u is not None else logp.argmax(-1)
            tok = tok.masked_fill(done, pad)
            answer[:, t], amask[:, t] = tok, (~done).long()
            lps[:, t] = logp.gather(-1, tok[:, None]).squeeze(-1).masked_fill(done, 0.0)
            done = done | (tok == eos)
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            cur_mask = torch.cat([cur_mask, cur_mask.new_ones(B, 1)], 1)
            logits = self._forward_logits(tok[:, None], cur_mask, next_pos, cache)
            next_pos = next_pos + 1
        texts = self.tokenizer.batch_decode(answer.masked_fill(amask == 0, pad), skip_special_tokens=True)
        return TextRollout(
            prompts=list(questions), images=images.cpu().float(), prompt_ids=ids.cpu(), prompt_mask=mask.cpu(),
            pixel_values=placeholder, answer_ids=answer.cpu(), answer_mask=amask.cpu(),
            logprobs_sampled=lps.cpu(), answers=[s.strip() for s in texts],
            group_ids=torch.as_tensor(group_ids if group_ids is not None else range(B)).long(),
            targets=list(targets or []), version=self.version, temperature=float(temperature))

    def _suppress_specials(self, logits: torch.Tensor) -> torch.Tensor:
        """Answers are text: no special, visual or layout token but EOS (sampling and teacher forcing)."""
        if not hasattr(self, "_special_mask"):
            V = logits.shape[-1]
            bad = set(self.tokenizer.all_special_ids) | set(self.visual_ids.tolist())
            bad |= {self.processor.image_token_id, self.eol_id, self.eof_id, self.eoi_id}
            bad.discard(self.eos_id)
            m = torch.zeros(V, dtype=torch.bool)
            m[[i for i in bad if i is not None and 0 <= i < V]] = True
            self._special_mask = m
        return logits.masked_fill(self._special_mask.to(logits.device), float("-inf"))

    def text_logprobs(self, batch: TextRollout) -> torch.Tensor:
        """Teacher-forced log-probs (B, A) of the answer tokens, with gradients (0 where masked)."""
        ids = torch.cat([batch.prompt_ids, batch.answer_ids], 1).to(self.device)
        mask = torch.cat([batch.prompt_mask, batch.answer_mask], 1).to(self.device)
        L, A = batch.prompt_ids.shape[1], batch.answer_ids.shape[1]
        hs = self._lm(ids, mask, positions_from_mask(mask))[:, L - 1:L - 1 + A]  # the head on answer positions only
        logits = self.emu3.lm_head(hs).float()
        temp = batch.temperature if batch.temperature > 0 else 1.0
        lp = selective_log_softmax(self._suppress_specials(logits) / temp, batch.answer_ids.to(self.device))
        # where, not a product: a padded position holds a suppressed token (-inf * 0 would be NaN)
        return torch.where(batch.answer_mask.to(self.device).bool(), lp, torch.zeros((), device=lp.device))

    def yes_probability(self, images: torch.Tensor, questions: list[str], grad: bool = False) -> torch.Tensor:
        """P(yes) / (P(yes) + P(no)) from the first answer token, per (image, question)."""
        yes, no = self.yes_no_ids()
        with torch.set_grad_enabled(grad):
            ids, mask, _ = self.encode_questions(images, questions)
            logits = self._forward_logits(ids, mask, positions_from_mask(mask), keep=1)[:, -1].float()
            return torch.sigmoid(logits[:, yes].logsumexp(-1) - logits[:, no].logsumexp(-1))
