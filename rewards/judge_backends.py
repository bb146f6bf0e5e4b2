"""What goes to a VLM judge and what comes back: prompt templates, requests and replies, and the two
backends (a local transformers model, an OpenAI-compatible HTTP endpoint) behind one interface.

`rewards/judges.py` turns replies into rewards; `rewards/server.py` serves a `TransformersVLM`
over HTTP; `rewards/tiny_judge.py` fits a tiny judge to the default templates.
"""
from __future__ import annotations

import base64
import io
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .parsing import MODES

log = logging.getLogger("uniloop.rewards.judges")

# ----------------------------------------------------------------------------- templates
# Our default prompts, written for this project in the spirit of UnifiedReward's. A real judge
# checkpoint works best with the exact template it was trained on: paste it as `template:`.
# Placeholders: {prompt} {question} {answer} {answer1} {answer2} {low} {high}; images go where
# {image} / {image1} / {image2} stand, or before the text when the template names no image.
# Only these exact placeholders are replaced, so other braces in a pasted template are kept.
DEFAULT_TEMPLATES = {
    "generation_pointwise": (
        "You are given a text caption and an image generated from it. Judge how well the image "
        "matches the caption and how good it looks.\nCaption: {prompt}\nReply with a short "
        "reason, then end with 'Final Score: X', where X is an integer from {low} to {high}."),
    "generation_pairwise": (
        "You are given a text caption and two images generated from it. Decide which image "
        "matches the caption better and looks better.\nCaption: {prompt}\nReply with a short "
        "reason, then end with 'Image 1 is better' or 'Image 2 is better'."),
    "understanding_pointwise": (
        "You are given an image, a question about it and an answer. Judge how correct and "
        "helpful the answer is.\nQuestion: {question}\nAnswer: {answer}\nReply with a short "
        "reason, then end with 'Final Score: X', where X is an integer from {low} to {high}."),
    "understanding_pairwise": (
        "You are given an image, a question about it and two answers. Decide which answer is "
        "more correct and helpful.\nQuestion: {question}\nAnswer 1: {answer1}\nAnswer 2: {answer2}\n"
        "Reply with a short reason, then end with 'Answer 1 is better' or 'Answer 2 is better'."),
}
COT_SUFFIX = ("\nFirst think step by step inside <think> </think>, then give only the final verdict "
              "inside <answer> </answer>.")
DEFAULT_RANGES = {"generation_pointwise": (1.0, 5.0), "understanding_pointwise": (0.0, 100.0)}
REQUIRED_FIELDS = {"generation_pointwise": ("prompt",), "generation_pairwise": ("prompt",),
                   "understanding_pointwise": ("question", "answer"),
                   "understanding_pairwise": ("question", "answer1", "answer2")}
_PLACEHOLDER = re.compile(r"\{(prompt|question|answer|answer1|answer2|low|high)\}")
_IMAGE_SLOT = re.compile(r"\{(image[12]?)\}")


def default_template(mode: str, cot: bool = False) -> str:
    if mode not in DEFAULT_TEMPLATES:
        raise ValueError(f"unknown judge mode {mode!r}; known: {', '.join(MODES)}")
    return DEFAULT_TEMPLATES[mode] + (COT_SUFFIX if cot else "")


def fill_template(template: str, images: list, **fields) -> list:
    """The user message as content parts: strings and images, in order.

    `{image}`/`{image1}` is the first image, `{image2}` the second; images the template does not
    place are put before the text (UnifiedReward's layout).
    """
    text = _PLACEHOLDER.sub(lambda m: str(fields[m.group(1)]) if m.group(1) in fields else m.group(0), template)
    parts, used, pos = [], set(), 0
    for m in _IMAGE_SLOT.finditer(text):
        idx = 1 if m.group(1) == "image2" else 0
        if idx < len(images):
            parts.append(text[pos:m.start()])
            parts.append(images[idx])
            used.add(idx)
            pos = m.end()
    parts.append(text[pos:])
    lead = [im for i, im in enumerate(images) if i not in used]
    return lead + [p for p in parts if not (isinstance(p, str) and not p)]


# ----------------------------------------------------------------------------- requests
@dataclass
class JudgeRequest:
    """One user turn: strings and images (float (H, W, 3) tensors in [0, 1] or PIL images)."""

    content: list


@dataclass
class JudgeReply:
    text: str | None
    finished: bool = True  # False when the generation hit max_tokens
    error: str | None = None  # set when no text came back (HTTP failure after the last retry)


def to_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    t = torch.as_tensor(image).detach().float().cpu()
    if t.dim() == 3 and t.shape[0] == 3 and t.shape[-1] != 3:
        t = t.permute(1, 2, 0)
    return Image.fromarray((t.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), "RGB")


def image_data_url(image, fmt: str = "png") -> str:
    buf = io.BytesIO()
    to_pil(image).save(buf, format=fmt.upper())
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def decode_data_url(url: str):
    """A `data:image/...;base64,...` URL -> PIL image (ValueError on anything else)."""
    from PIL import Image

    m = re.match(r"data:image/[a-zA-Z0-9.+-]+;base64,(.*)$", url, re.S)
    if not m:
        raise ValueError("only base64 data URLs (data:image/...;base64,...) are accepted")
    try:
        return Image.open(io.BytesIO(base64.b64decode(m.group(1), validate=True))).convert("RGB")
    except Exception as e:
        raise ValueError(f"undecodable image data URL: {e}") from None


def request_to_messages(req: JudgeRequest) -> tuple[list[dict], list]:
    """HF chat messages (`{"type": "image"}` placeholders) plus the images in order."""
    content, images = [], []
    for part in req.content:
        if isinstance(part, str):
            content.append({"type": "text", "text": part})
        else:
            content.append({"type": "image"})
            images.append(to_pil(part))
    return [{"role": "user", "content": content}], images


# ----------------------------------------------------------------------------- backends
class JudgeBackend:
    """Turns chat requests into replies. Failures of a single request come back as a JudgeReply
    with `error` set (the sample becomes invalid); a broken backend raises."""

    def generate(self, requests: list[JudgeRequest]) -> list[JudgeReply]:
        raise NotImplementedError

    def close(self):
        pass


class TransformersVLM:
    """A transformers image-text-to-text model that answers chat messages, batched.

    Shared by the local backend and `uniloop serve-judge`. Greedy when temperature is 0.
    """

    def __init__(self, name_or_path: str, device: str = "cpu", dtype: str = "float32",
                 attn_implementation: str | None = None, batch_size: int = 8):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        kwargs = {"dtype": getattr(torch, dtype) if isinstance(dtype, str) else dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        self.processor = AutoProcessor.from_pretrained(str(name_or_path))
        self.model = AutoModelForImageTextToText.from_pretrained(str(name_or_path), **kwargs).to(device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"  # generation continues from the last prompt token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device, self.batch_size, self.name = torch.device(device), batch_size, str(name_or_path)
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.lock = threading.Lock()  # one generate at a time on this model (server threads)

    def encode(self, conversations: list[tuple[list[dict], list]], add_generation_prompt: bool = True,
               suffixes: list[str] | None = None):
        texts = [self.processor.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)
                 for msgs, _ in conversations]
        if suffixes is not None:
            texts = [t + s for t, s in zip(texts, suffixes)]
        images = [imgs for _, imgs in conversations]
        kwargs = {"images": images} if any(images) else {}
        return self.processor(text=texts, padding=True, return_tensors="pt", **kwargs)

    @torch.no_grad()
    def chat(self, conversations: list[tuple[list[dict], list]], max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> list[tuple[str, bool, int, int]]:
        """(text, finished, prompt_tokens, completion_tokens) per conversation."""
        out = []
        for i in range(0, len(conversations), self.batch_size):
            chunk = conversations[i:i + self.batch_size]
            enc = self.encode(chunk).to(self.device)
            gen = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0,
                   "pad_token_id": self.tokenizer.pad_token_id}
            if temperature > 0:
                gen.update(temperature=temperature, top_p=top_p)
            else:  # greedy; silence sampling defaults a checkpoint's generation_config may carry
                gen.update(temperature=None, top_p=None, top_k=None)
            with self.lock:
                if seed is not None:
                    torch.manual_seed(seed)
                ids = self.model.generate(**enc, **gen)
            new = ids[:, enc["input_ids"].shape[1]:].cpu()
            for row, mask in zip(new, enc["attention_mask"].cpu()):
                hit = [j for j, t in enumerate(row.tolist()) if t in self.eos_ids]
                n = hit[0] + 1 if hit else len(row)
                text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
                out.append((text.strip(), bool(hit), int(mask.sum()), n))
        return out


class LocalJudgeBackend(JudgeBackend):
    def __init__(self, engine: TransformersVLM, max_new_tokens: int = 256, temperature: float = 0.0):
        self.engine, self.max_new_tokens, self.temperature = engine, max_new_tokens, temperature

    def generate(self, requests: list[JudgeRequest]) -> list[JudgeReply]:
        res = self.engine.chat([request_to_messages(r) for r in requests], self.max_new_tokens, self.temperature)
        return [JudgeReply(text, finished) for text, finished, _, _ in res]


RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAIJudgeBackend(JudgeBackend):
    """OpenAI-compatible chat completions (vLLM, SGLang, `uniloop serve-judge`).

    Each request is retried on timeouts, connection errors and HTTP 408/409/425/429/5xx, waiting
    backoff * 2^attempt seconds (with jitter, capped at max_backoff); other HTTP errors fail at
    once. A request that still fails gives a reply with `error` set: that sample is invalid and
    the run goes on. The API key is kept out of reprs, logs and error messages.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, concurrency: int = 8,
                 timeout: float = 60.0, max_retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0,
                 max_tokens: int = 512, temperature: float = 0.0, extra_body: dict | None = None,
                 image_format: str = "png"):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.url = base_url.rstrip("/") + ("" if base_url.rstrip("/").endswith("/chat/completions")
                                            else "/chat/completions")
        self.model, self.timeout, self.max_retries = model, float(timeout), int(max_retries)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.max_tokens, self.temperature = max_tokens, temperature
        self.extra_body, self.image_format = dict(extra_body or {}), image_format
        self._api_key = None
        if api_key_env:
            self._api_key = os.environ.get(api_key_env)
            if not self._api_key:
                raise ValueError(f"judge api_key_env: environment variable {api_key_env!r} is not set")
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="judge")
        self._local = threading.local()

    def __repr__(self):
        return f"OpenAIJudgeBackend(url={self.url!r}, model={self.model!r}, key={'set' if self._api_key else 'none'})"

    def _session(self):
        import requests

        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _scrub(self, msg: str) -> str:
        return msg.replace(self._api_key, "***") if self._api_key else msg

    def payload(self, req: JudgeRequest) -> dict:
        content = [{"type": "text", "text": p} if isinstance(p, str)
                   else {"type": "image_url", "image_url": {"url": image_data_url(p, self.image_format)}}
                   for p in req.content]
        return {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": self.max_tokens, "temperature": self.temperature, **self.extra_body}

    def _one(self, index: int, req: JudgeRequest) -> JudgeReply:
        import requests

        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        body = self.payload(req)
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            try:
                r = self._session().post(self.url, json=body, headers=headers, timeout=self.timeout)
            except requests.Timeout:
                last, retry = f"timed out after {self.timeout:g} s", True
            except requests.ConnectionError as e:
                last, retry = f"connection error: {type(e).__name__}", True
            else:
                if r.status_code == 200:
                    try:
                        choice = r.json()["choices"][0]
                        text = choice["message"]["content"]
                        if text is not None and not isinstance(text, str):
                            raise TypeError("content is not a string")
                        return JudgeReply(text, finished=choice.get("finish_reason") != "length")
                    except Exception as e:  # a 200 with a body we cannot read: the server is broken
                        return JudgeReply(None, error=self._scrub(f"malformed response: {e}"))
                last = f"HTTP {r.status_code}: {self._scrub(r.text[:200])}"
                retry = r.status_code in RETRY_STATUS
            if not retry or attempt == self.max_retries:
                break
            wait = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)
            log.warning("judge request %d failed (%s); retry %d/%d in %.2f s", index, last, attempt + 1,
                        self.max_retries, wait)
            time.sleep(wait)
        log.warning("judge request %d gave up: %s", index, last)
        return JudgeReply(None, error=last)

    def generate(self, requests: list[JudgeRequest]) -> list[JudgeReply]:
        return list(self._pool.map(self._one, range(len(requests)), requests))

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)
