"""A fast image sampler for `JanusPolicy`: static KV cache, CUDA-graph decode steps, sampling on the device.

Why: the plain sampler (`JanusPolicy._sample_tokens_plain`) runs the language model through
transformers once per image token with a growing `DynamicCache`: ~1000 small kernel launches and a
`torch.cat` of the whole cache per layer per step. For a 576-token image that is launch-bound
(tens of ms per step for a 1B model, where reading the weights and the cache takes 1-5 ms).

What this does instead, per call:
  1. the prompt prefill runs exactly as in the plain sampler (transformers, `DynamicCache`) and its
     keys/values are copied into a preallocated static cache for the doubled CFG batch;
  2. every decode step calls the language model's own modules (norms, q/k/v/o projections, MLP;
     PEFT LoRA layers included, so an active adapter applies) and transformers' rotary function,
     writes the new key/value into the static cache, and runs SDPA over the *filled* prefix only;
  3. the head, CFG combination, log-softmax, top-k and inverse-CDF sampling (`uniforms_for`,
     `inverse_cdf_sample` from sampling.py) run on the device and write tokens and log-probs into
     device buffers at a step index kept on the device: no host synchronisation until the end.

On CUDA the step is captured as a CUDA graph per (batch, attention-length bucket of 64 positions,
sampling settings) and replayed: the write position is a device tensor and positions beyond the
filled prefix are masked, so one graph serves 64 consecutive steps (~10 graphs per image) and
prompts of other lengths reuse them. Graphs are kept for later calls and dropped when the
weights' storage, the adapter's enabled state or the batch size changes. On the CPU the step runs
eagerly over exactly the filled prefix (what the CPU tests check against the plain sampler).

Same tokens as the plain sampler: with exact-length attention (bucket=1, the eager default) a
decode step issues the same operations on the same shapes as transformers' Llama decode with
SDPA attention (key/value tensors are views of the static cache instead of freshly concatenated
copies, with the same values): on the CPU the two give the same bits in float32 and bfloat16
(tests/test_fast_sampler.py). Measured on an H100 (BENCHMARKS.md): in float32 the graphed sampler
gives the plain sampler's greedy tokens with bit-identical log-probs; the graphs are bit-identical
to the same step run eagerly, with and without an active LoRA adapter. In bf16 on the GPU the
tokens agree with the plain sampler for the first ~110 steps and then drift apart: SDPA's default
decode kernel was not run-to-run deterministic beyond 128 keys (the same inputs gave different
bits), and CFG amplifies 1-ulp differences, so no bf16 sampler reproduces another bit for bit.
The graphs therefore pin the memory-efficient kernel, which is deterministic. Recorded log-probs
match teacher forcing as closely as the plain sampler's do (bf16, CFG 5, 1B shape: guided
log-probs within 0.26 max / 0.053 mean abs, conditional within 0.047 / 0.008).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .sampling import (cache_kwargs, entropy_of, filter_top_k, generation_logits, guided_logits, inverse_cdf_sample,
                       positions_from_mask, uniforms_for)

SAMPLERS = ("auto", "plain", "fast")


def choose_sampler(name: str, device) -> str:
    """'auto' -> 'fast' on CUDA, 'plain' elsewhere; 'plain' / 'fast' force one."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")
    if name == "auto":
        return "fast" if torch.device(device).type == "cuda" else "plain"
    return name


def _rotary(q, k, cos, sin):
    # transformers' own function, so the bits match its decode step.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    return apply_rotary_pos_emb(q, k, cos, sin)


def _cache_layer_kv(cache, i):
    """(keys, values) of layer i of a transformers DynamicCache, across cache API versions."""
    if hasattr(cache, "layers"):
        layer = cache.layers[i]
        return layer.keys, layer.values
    return cache.key_cache[i], cache.value_cache[i]  # pragma: no cover - older transformers


@dataclass
class _Workspace:
    """Static buffers of one (batch, cache capacity); CUDA graphs bake in their addresses."""

    batch: int  # B, samples
    rows: int  # 2B with CFG, else B
    capacity: int  # cache positions (>= prompt length + image tokens - 1)
    keys: list
    values: list
    mask: torch.Tensor  # (rows, capacity) bool, 1 = attend
    pos: torch.Tensor  # (rows, 1) position of the token fed next
    slot: torch.Tensor  # (1,) long: cache index the next decode step writes
    step: torch.Tensor  # (1,) long: index of the image token sampled next
    tok_prev: torch.Tensor  # (B,) last sampled token
    uniforms: torch.Tensor  # (B, T) float64
    tokens: torch.Tensor  # (B, T) long
    lp_cfg: torch.Tensor  # (B, T) float32
    lp_cond: torch.Tensor  # (B, T) float32
    entropy: torch.Tensor  # (B, T) float32 entropy of the distribution each token was drawn from
    graphs: dict = field(default_factory=dict)
    warmed: bool = False

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class FastImageSampler:
    """Static-cache, graph-captured image sampling for one `JanusPolicy` (see the module docstring)."""

    def __init__(self, policy, use_graphs: bool | None = None, bucket: int | None = None,
                 capacity_multiple: int = 64):
        self.policy = policy
        self.use_graphs = (policy.device.type == "cuda") if use_graphs is None else use_graphs
        if self.use_graphs and policy.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA policy")
        # Attention length granularity. 1: attend exactly the filled prefix, mirroring transformers'
        # decode op for op (bit-identical to the plain sampler; the eager default). >1: attend the
        # filled prefix rounded up to a multiple of `bucket`, the unfilled tail masked out, so one
        # CUDA graph serves `bucket` consecutive steps (graphs default: 64).
        self.bucket = bucket if bucket is not None else (64 if self.use_graphs else 1)
        if self.bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {self.bucket}")
        self.capacity_multiple = max(capacity_multiple, self.bucket)
        self.ws: _Workspace | None = None
        self._signature = None
        self._capture_stream = None
        self.last_step_events = None
        self.stats = {"captures": 0, "replays": 0, "eager_steps": 0}
        self._settings = None  # (cfg_scale, temperature, top_k, use_cfg) of the current call
        self.profile_steps = False  # benchmarks: record a CUDA event per decode step

    # ------------------------------------------------------------------ bookkeeping
    @property
    def lm(self):
        return self.policy.janus.model.language_model

    def release(self):
        """Drop the static cache and the captured graphs (frees their GPU memory)."""
        if self.ws is not None:
            if self.policy.device.type == "cuda":
                torch.cuda.synchronize()  # no replay in flight while its graph is destroyed
            self.ws.graphs.clear()
        self.ws = None
        self._signature = None
        if self.policy.device.type == "cuda":
            torch.cuda.empty_cache()

    def _weights_signature(self):
        """Changes when graphs would replay stale addresses or a stale adapter switch."""
        janus = self.policy.janus
        sig = [id(self.policy.model), janus.training]  # train mode would capture LoRA dropout
        for mod in (janus.model.language_model, janus.model.generation_head,
                    janus.model.generation_embeddings, janus.model.generation_aligner):
            sig.extend(p.data_ptr() for p in mod.parameters())
        if not self.policy.has_adapter:
            return tuple(sig)
        from peft.tuners.tuners_utils import BaseTunerLayer
        for m in janus.model.language_model.modules():
            if isinstance(m, BaseTunerLayer):
                # PEFT tuner layers: enabled/disabled (reference()), active set, merged state.
                sig.append((id(m), bool(m.disable_adapters), tuple(m.active_adapters), bool(m.merged)))
        return tuple(sig)

    def _check_model(self):
        cfg = self.lm.config
        if cfg.num_attention_heads != cfg.num_key_value_heads:
            raise NotImplementedError("the fast sampler mirrors attention without grouped KV heads (as in Janus); "
                                      "use sampler='plain'")

    def _workspace(self, batch: int, rows: int, needed: int, T: int) -> _Workspace:
        ws = self.ws
        if ws is not None and ws.batch == batch and ws.rows == rows and ws.capacity >= needed \
                and ws.tokens.shape[1] == T:
            return ws
        self.release()
        cfg, dev, dtype = self.lm.config, self.policy.device, self.policy.dtype
        m = self.capacity_multiple
        cap = -(-needed // m) * m
        cap = -(-cap // self.bucket) * self.bucket
        heads = cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_dtype = self.lm.layers[0].self_attn.o_proj.weight.dtype if dtype is None else dtype
        n = cfg.num_hidden_layers
        self.ws = _Workspace(
            batch=batch, rows=rows, capacity=cap,
            # zeros, not empty: masked-out tail positions are still multiplied by 0 in attention,
            # and 0 * NaN garbage would be NaN
            keys=[torch.zeros(rows, heads, cap, head_dim, dtype=kv_dtype, device=dev) for _ in range(n)],
            values=[torch.zeros(rows, heads, cap, head_dim, dtype=kv_dtype, device=dev) for _ in range(n)],
            mask=torch.zeros(rows, cap, dtype=torch.bool, device=dev),
            pos=torch.zeros(rows, 1, dtype=torch.long, device=dev),
            slot=torch.zeros(1, dtype=torch.long, device=dev),
            step=torch.zeros(1, dtype=torch.long, device=dev),
            tok_prev=torch.zeros(batch, dtype=torch.long, device=dev),
            uniforms=torch.zeros(batch, T, dtype=torch.float64, device=dev),
            tokens=torch.zeros(batch, T, dtype=torch.long, device=dev),
            lp_cfg=torch.zeros(batch, T, dtype=torch.float32, device=dev),
            lp_cond=torch.zeros(batch, T, dtype=torch.float32, device=dev),
            entropy=torch.zeros(batch, T, dtype=torch.float32, device=dev))
        return self.ws

    # ------------------------------------------------------------------ the step (captured on CUDA)
    def _sample_into_buffers(self, h_last: torch.Tensor):
        """Head + CFG + sampling, written at the device-side step index; then advance the step."""
        ws = self.ws
        cfg_scale, temperature, top_k, use_cfg = self._settings
        B = ws.batch
        # Same expressions, in the same order, as the plain sampler (bit-identical results).
        logits = generation_logits(self.policy.janus.model.generation_head, h_last)
        cond, uncond = (logits[:B], logits[B:]) if use_cfg else (logits, None)
        temp = temperature if temperature > 0 else 1.0
        guided = F.log_softmax(filter_top_k(guided_logits(cond, uncond, cfg_scale) / temp, top_k), -1)
        if temperature > 0:
            u = ws.uniforms.index_select(1, ws.step).squeeze(1)
            tok = inverse_cdf_sample(guided, u)
        else:
            tok = guided.argmax(-1)
        idx = tok[:, None]
        ws.tokens.index_copy_(1, ws.step, idx)
        ws.lp_cfg.index_copy_(1, ws.step, guided.gather(-1, idx))
        ws.lp_cond.index_copy_(1, ws.step, F.log_softmax(cond / temp, -1).gather(-1, idx))
        ws.entropy.index_copy_(1, ws.step, entropy_of(guided)[:, None])
        ws.tok_prev.copy_(tok)
        ws.step.add_(1)
        ws.pos.add_(1)
        ws.slot.add_(1)

    def _decode_step(self, length: int, masked: bool):
        """Feed the last sampled token at cache index `ws.slot`; attend cache positions [0, length);
        sample the next token. Positions not yet filled are masked out (`ws.mask`).

        Mirrors transformers' LlamaModel/LlamaDecoderLayer/LlamaAttention(sdpa) decode, op for op;
        with `length` = the filled length and no padding (masked=False) it is the same computation.
        """
        ws, lm, policy = self.ws, self.lm, self.policy
        use_cfg = self._settings[3]
        tok = ws.tok_prev
        step_tok = torch.cat([tok, tok]) if use_cfg else tok
        h = policy._image_token_embeds(step_tok[:, None])
        cos, sin = lm.rotary_emb(h, position_ids=ws.pos)
        ws.mask.index_fill_(1, ws.slot, True)
        # transformers passes no mask when nothing is padded (-> flash kernel), else a bool 4D mask.
        mask4 = ws.mask[:, None, None, :length] if masked else None
        for i, layer in enumerate(lm.layers[: lm.config.num_hidden_layers]):
            attn = layer.self_attn
            residual = h
            x = layer.input_layernorm(h)
            input_shape = x.shape[:-1]
            hidden_shape = (*input_shape, -1, attn.head_dim)
            q = attn.q_proj(x).view(hidden_shape).transpose(1, 2)
            k = attn.k_proj(x).view(hidden_shape).transpose(1, 2)
            v = attn.v_proj(x).view(hidden_shape).transpose(1, 2)
            q, k = _rotary(q, k, cos, sin)
            ws.keys[i].index_copy_(2, ws.slot, k)
            ws.values[i].index_copy_(2, ws.slot, v)
            key, value = ws.keys[i][:, :, :length], ws.values[i][:, :, :length]
            o = self._attend(q, key, value, mask4, attn.scaling)
            o = o.reshape(o.shape[0], -1, 1, value.shape[-1]).transpose(1, 2).contiguous()
            o = attn.o_proj(o.reshape(*input_shape, -1).contiguous())
            h = residual + o
            residual = h
            h = layer.post_attention_layernorm(h)
            h = layer.mlp(h)
            h = residual + h
        h = lm.norm(h)
        self._sample_into_buffers(h[:, -1])

    def _attend(self, q, key, value, mask4, scaling):
        """Decode attention as the language model's own implementation computes it: transformers' eager
        attention (the CPU default in half precision: row-for-row what teacher forcing computes) or SDPA."""
        if getattr(self.lm.config, "_attn_implementation", "sdpa") == "eager":
            w = torch.matmul(q, key.transpose(2, 3)) * scaling
            if mask4 is not None:  # transformers' additive mask: 0 where attended, the dtype's minimum elsewhere
                w = w + torch.zeros_like(mask4, dtype=w.dtype).masked_fill_(~mask4, torch.finfo(w.dtype).min)
            w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            return torch.matmul(w, value)
        with self._attention_backend():
            return F.scaled_dot_product_attention(q, key, value, attn_mask=mask4, dropout_p=0.0, scale=scaling,
                                                  is_causal=False)

    def _attention_backend(self):
        """Bucketed (masked) decode attention on CUDA runs on the memory-efficient kernel.

        Measured on H100 / torch 2.11: with SDPA's default choice, decode attention over more than
        128 keys was not run-to-run deterministic (identical inputs gave different bits), and slow.
        The memory-efficient kernel computes each (row, head) in one pass: same bits every replay.
        """
        if self.bucket > 1 and self.policy.device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ graphs
    def _run_step(self, length: int, masked: bool):
        """One decode step whose cache holds `length` positions once the fed token is written."""
        if self.bucket > 1:  # attend a bucketed length; the tail beyond `length` is masked
            length = min(self.ws.capacity, -(-length // self.bucket) * self.bucket)
            masked = True
        if not self.use_graphs:
            self._decode_step(length, masked)
            self.stats["eager_steps"] += 1
            return
        ws = self.ws
        key = (length, masked) + self._settings
        graph = ws.graphs.get(key)
        if graph is None:
            graph = self._capture(length, masked)
            if graph is None:  # capture failed: this sampler runs eagerly from now on
                self._decode_step(length, masked)
                self.stats["eager_steps"] += 1
                return
            ws.graphs[key] = graph
        graph.replay()
        self.stats["replays"] += 1

    def _capture(self, length: int, masked: bool):
        ws = self.ws
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(device=self.policy.device)
        stream = self._capture_stream
        if not ws.warmed:
            # One eager run on the capture stream creates library handles/workspaces before capture.
            # It writes what the real step will write again (same inputs); the counters are restored.
            saved = (ws.step.clone(), ws.pos.clone(), ws.tok_prev.clone(), ws.slot.clone(), ws.mask.clone())
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._decode_step(length, masked)
            torch.cuda.current_stream().wait_stream(stream)
            ws.step.copy_(saved[0])
            ws.pos.copy_(saved[1])
            ws.tok_prev.copy_(saved[2])
            ws.slot.copy_(saved[3])
            ws.mask.copy_(saved[4])
            ws.warmed = True
        graph = torch.cuda.CUDAGraph()
        # capture_begin/end directly (not torch.cuda.graph): that context synchronises and empties
        # the allocator cache on every capture. Each graph keeps its own private memory pool (one
        # step's temporaries, tens of MB; ~10 graphs per image): sharing one pool across graphs
        # hit an allocator assertion on torch 2.11 after graphs were released and re-captured.
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                graph.capture_begin()
                try:
                    self._decode_step(length, masked)
                finally:
                    graph.capture_end()
        except Exception as e:  # e.g. a quantized layer whose kernels cannot be captured
            warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); the fast sampler continues "
                          "without graphs (static cache, no host syncs)")
            self.stats["capture_failed"] = f"{type(e).__name__}: {str(e)[:200]}"
            self.use_graphs = False
            torch.cuda.synchronize()
            return None
        torch.cuda.current_stream().wait_stream(stream)
        self.stats["captures"] += 1
        return graph

    # ------------------------------------------------------------------ entry point
    @torch.no_grad()
    def sample(self, ids: torch.Tensor, mask: torch.Tensor, seeds: list[int], cfg_scale: float,
               temperature: float, top_k: int, num_tokens: int | None = None):
        """Tokens (B, T), log-probs under the guided and the conditional distribution (B, T).

        `ids`/`mask` are the encoded (left-padded) prompts, as `encode_generation_prompts` returns.
        """
        from transformers import DynamicCache

        self._check_model()
        policy = self.policy
        B, P = ids.shape
        T = num_tokens or policy.num_image_tokens
        use_cfg = cfg_scale > 1.0
        if use_cfg:
            ids2, mask2 = torch.cat([ids, policy.unconditional_ids(ids)]), mask.repeat(2, 1)
        else:
            ids2, mask2 = ids, mask
        rows = ids2.shape[0]
        signature = self._weights_signature()
        if signature != self._signature:
            if self.ws is not None:
                self.ws.graphs.clear()
            self._signature = signature
        ws = self._workspace(B, rows, P + T - 1, T)
        self._settings = (float(cfg_scale), float(temperature), int(top_k), use_cfg)
        masked = not bool(mask2.all())  # the one host sync before the loop

        # Prefill exactly as the plain sampler does, then move its keys/values into the static cache.
        cache = DynamicCache()
        pos = positions_from_mask(mask2)
        out = policy._lm(inputs_embeds=policy._embed(ids2), attention_mask=mask2, position_ids=pos,
                         use_cache=True, **cache_kwargs(cache))
        for i in range(self.lm.config.num_hidden_layers):
            k, v = _cache_layer_kv(cache, i)
            ws.keys[i][:, :, :P].copy_(k)
            ws.values[i][:, :, :P].copy_(v)
        del cache
        ws.mask.fill_(False)
        ws.mask[:, :P].copy_(mask2.bool())
        ws.pos.copy_(pos[:, -1:])
        ws.slot.fill_(P - 1)  # advanced to P by the first sample below
        ws.step.zero_()
        if temperature > 0:
            ws.uniforms.copy_(uniforms_for(seeds, T, policy.device))
        self._sample_into_buffers(out.last_hidden_state[:, -1])
        del out
        timed = policy.device.type == "cuda"
        if timed:  # decode-loop timing for the benchmarks (events only: no host sync here)
            self.last_decode_events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self.last_decode_events[0].record()
        step_events = [] if (timed and self.profile_steps) else None
        for t in range(1, T):
            if step_events is not None:
                step_events.append(torch.cuda.Event(enable_timing=True))
                step_events[-1].record()
            self._run_step(P + t, masked)
        self.last_step_events = step_events
        if timed:
            self.last_decode_events[1].record()
        self.last_decode_steps = T - 1
        return ws.tokens.clone(), ws.lp_cfg.clone(), ws.lp_cond.clone(), ws.entropy.clone()

    def last_decode_ms_per_step(self) -> float:
        """Mean device time of one decode step in the last call (CUDA only; synchronises)."""
        start, end = self.last_decode_events
        end.synchronize()
        return start.elapsed_time(end) / max(1, self.last_decode_steps)


def fast_sampler_for(policy) -> FastImageSampler:
    """The policy's sampler (created on first use and kept: its graphs are reused across calls)."""
    sampler = getattr(policy, "_fast_image_sampler", None)
    if sampler is None:
        sampler = FastImageSampler(policy)
        policy._fast_image_sampler = sampler
    return sampler
