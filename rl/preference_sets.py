"""Preference sets: validated records (rl/preference_data.py) turned into the typed pair batches the
learner trains on (generation images as VQ token ids, cached by file hash and VQ model; understanding
images as tensors), the synthetic color set of the quickstarts, and the train/held-out sets of a run.
"""
from __future__ import annotations

import hashlib
import os
import random
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..policies.batches import GENERATION, UNDERSTANDING, GenerationPair, UnderstandingPair
from ..policies.registry import is_tiny
from ..policies.tiny import COLORS, palette, solid_color_images
from .preference_data import (DatasetImage, GenerationRecord, PairToWrite, PreferenceDataError, PreferenceRecords,
                              UnderstandingRecord, _is_pil, load_image_tensor, read_train_eval, write_preference_jsonl)


def vq_image_size(policy) -> int:
    """Pixel size the policy's VQ model encodes/decodes (384 for Janus-Pro, 8 for the tiny model)."""
    return policy.vq_image_size


def vq_codebook_size(policy) -> int:
    return policy.codebook_size


def vq_model_key(policy) -> str:
    """Identifies the VQ tokenizer: same key -> same tokens for the same image bytes."""
    return policy.vq_fingerprint()


def image_content_key(value) -> str:
    """sha256 of an image's bytes (file content, or the decoded pixels of an in-memory image)."""
    h = hashlib.sha256()
    if isinstance(value, DatasetImage):
        value = value.fetch()
    if _is_pil(value):
        h.update(f"{value.mode}{value.size}".encode())
        h.update(value.tobytes())
    elif isinstance(value, dict) and value.get("bytes"):
        h.update(value["bytes"])
    else:
        p = Path(value["path"] if isinstance(value, dict) else value)
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class VQTokenCache:
    """image content hash -> VQ token ids, one safetensors file per VQ model (keyed by `vq_model_key`).

    Encoding 100k images through a 384-px VQ encoder takes a while; a second run (or a resumed
    one) over the same files re-uses the ids. Written atomically, so a killed run never leaves a
    corrupt cache behind.
    """

    def __init__(self, cache_dir: str | os.PathLike | None, model_key: str):
        self.path = Path(cache_dir) / f"vq_tokens_{model_key}.safetensors" if cache_dir else None
        self.entries: dict[str, torch.Tensor] = {}
        self.dirty = False
        self.hits = 0
        if self.path is not None and self.path.exists():
            from safetensors.torch import load_file
            try:
                self.entries = dict(load_file(str(self.path)))
            except Exception as e:  # a cache is disposable: rebuild it rather than fail the run
                warnings.warn(f"ignoring unreadable VQ token cache {self.path}: {e}", stacklevel=2)

    def get(self, key: str) -> torch.Tensor | None:
        t = self.entries.get(key)
        if t is not None:
            self.hits += 1
        return t

    def put(self, key: str, tokens: torch.Tensor):
        self.entries[key] = tokens.to(torch.int32).contiguous()
        self.dirty = True

    def save(self):
        if self.path is None or not self.dirty:
            return
        from safetensors.torch import save_file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".vq_tokens_", suffix=".tmp")
        os.close(fd)
        save_file(self.entries, tmp)
        os.replace(tmp, self.path)
        self.dirty = False


def encode_generation_records(policy, records: list[GenerationRecord], cache_dir=None, batch_size: int = 32,
                              use_record_tokens: bool = True) -> GenerationPair:
    """Turn generation records into a GenerationPair of VQ token ids with the policy's own VQ encoder.

    Images are centre-cropped and resized to the VQ resolution; ids already in the record
    (`chosen_tokens`, as `uniloop pairs` writes them) are used as they are when
    `use_record_tokens` and they fit this policy (length and codebook size).
    """
    T, V, size = policy.num_image_tokens, vq_codebook_size(policy), vq_image_size(policy)
    cache = VQTokenCache(cache_dir, vq_model_key(policy))
    out = {"chosen": [None] * len(records), "rejected": [None] * len(records)}
    todo: list[tuple[str, int, str]] = []  # (side, record index, content key)
    for i, r in enumerate(records):
        for side in ("chosen", "rejected"):
            given = getattr(r, f"{side}_tokens")
            if given is not None and use_record_tokens:
                if len(given) != T or min(given) < 0 or max(given) >= V:
                    raise PreferenceDataError(
                        f"{r.where}: field '{side}_tokens' has {len(given)} ids in [{min(given)}, {max(given)}]; "
                        f"this policy needs {T} ids in [0, {V})")
                out[side][i] = torch.tensor(given, dtype=torch.long)
                continue
            key = image_content_key(getattr(r, side))
            hit = cache.get(key)
            if hit is not None:
                out[side][i] = hit.long()
            else:
                todo.append((side, i, key))
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        imgs = torch.stack([load_image_tensor(getattr(records[i], side), size, records[i].where, side)
                            for side, i, _ in chunk])
        toks = policy.encode_images(imgs).cpu().long()
        for (side, i, key), t in zip(chunk, toks):
            out[side][i] = t
            cache.put(key, t)
    cache.save()
    empty = torch.zeros(0, T, dtype=torch.long)
    return GenerationPair(
        prompts=[r.prompt for r in records],
        chosen_tokens=torch.stack(out["chosen"]) if records else empty,
        rejected_tokens=torch.stack(out["rejected"]) if records else empty,
        meta=[dict(r.meta) for r in records])


def understanding_batch(records: list[UnderstandingRecord], image_size: int) -> UnderstandingPair:
    """Load the images of understanding records (at the policy's understanding resolution)."""
    imgs = [load_image_tensor(r.image, image_size, r.where, "image") for r in records]
    return UnderstandingPair(
        questions=[r.question for r in records],
        images=torch.stack(imgs) if imgs else torch.zeros(0, image_size, image_size, 3),
        chosen=[r.chosen for r in records], rejected=[r.rejected for r in records],
        meta=[dict(r.meta) for r in records])


@dataclass
class PreferenceSet:
    """Training-ready pairs: generation pairs tokenised, understanding pairs with images loaded."""

    generation: GenerationPair
    understanding: UnderstandingPair
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.generation) + len(self.understanding)


def build_preference_set(policy, records: PreferenceRecords, cache_dir=None,
                         use_record_tokens: bool = True) -> PreferenceSet:
    return PreferenceSet(
        generation=encode_generation_records(policy, records.generation, cache_dir,
                                             use_record_tokens=use_record_tokens),
        understanding=understanding_batch(records.understanding, policy.image_size),
        skipped=records.skipped)


# ----------------------------------------------------------------------------- writing


# ----------------------------------------------------------------------------- synthetic data
def write_synthetic_preference_set(scfg, out_dir: Path, seed: int, gen_size: int, und_size: int,
                                   num_image_tokens: int | None = None) -> tuple[Path, Path]:
    """A color preference set in the documented format: train/ and eval/ JSONL + PNG directories.

    generation:    "a red image" -> a (noisy) red image preferred over another color's image
    understanding: a red image + "What color ...?" -> "red" preferred over another color word
    Eval holds out whole (right color, wrong color) combinations, so held-out accuracy measures
    generalisation, not memorised pairs.
    """
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


# ----------------------------------------------------------------------------- a run's sets
def read_run_records(cfg, run_dir: Path, algorithm: str, write_synthetic=None):
    """Train and held-out records of `preference_data`: its files, plus the synthetic set that
    `write_synthetic(synthetic_cfg, out_dir) -> (train_path, eval_path or None)` writes when configured."""
    pd = cfg.preference_data
    if pd is None:
        raise ValueError(f"algorithm: {algorithm} needs a `preference_data` section (train files or `synthetic`)")
    train_src, eval_src = list(pd.train), list(pd.eval)
    if pd.synthetic is not None:
        tr, ev = write_synthetic(pd.synthetic, run_dir / "synthetic_pairs")
        train_src.append(str(tr))
        if ev is not None:
            eval_src.append(str(ev))
    if not train_src:
        raise ValueError("preference_data.train is empty and no `synthetic` set is configured")
    return read_train_eval(pd, train_src, eval_src, cfg.seed)


def load_run_data(cfg, policy, run_dir: Path) -> tuple[PreferenceSet, PreferenceSet, dict]:
    """Train and held-out PreferenceSets for a config, validated up front; plus data metrics."""
    pd = cfg.preference_data

    def synthetic(scfg, out_dir):
        exact = scfg.palette_tokens and is_tiny(cfg.model.name_or_path)
        return write_synthetic_preference_set(scfg, out_dir, cfg.seed, vq_image_size(policy), policy.image_size,
                                              policy.num_image_tokens if exact else None)

    train, held = read_run_records(cfg, run_dir, "dpo", synthetic)
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
