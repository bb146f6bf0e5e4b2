"""Preference data: the on-disk format, validation, VQ tokenisation (cached), and typed pair batches.

The format (documented in the README, written by `uniloop pairs`):

* JSONL, one record per pair; image paths are relative to the JSONL file.
  - generation pair:    {"prompt": str, "chosen": image path, "rejected": image path}
  - understanding pair: {"image": image path, "question": str, "chosen": str, "rejected": str}
  A record is a generation pair when it has `prompt`, an understanding pair when it has `question`
  (or says so with `"kind": "generation" | "understanding"`). Generation pairs may also carry
  `chosen_tokens` / `rejected_tokens` (the exact VQ ids they were sampled as); they are used
  instead of re-encoding the PNG when they fit the policy. Every other field (scores, judge
  verdicts, ids) is kept, untouched, in the record's `meta`.
* A Hugging Face `datasets` dataset with the same columns: a directory written by
  `save_to_disk`, or (on a machine with internet) a hub id. Image columns may hold `datasets.Image`
  values (PIL images) or paths relative to the dataset directory.

Everything is validated before training starts: a missing or corrupt image, a missing field or a
wrong type is an error naming the file, the line (or row) and the field. With `skip_invalid`
bad records are dropped instead and counted (`PreferenceRecords.skipped`).
"""
from __future__ import annotations

import io
import json
import os
import random
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..policies.batches import GENERATION, UNDERSTANDING

JSONL_NAME = "pairs.jsonl"  # the file `uniloop pairs` writes inside its output directory


class PreferenceDataError(ValueError):
    """A bad preference record; the message names the file, the line (or row) and the field."""


# ----------------------------------------------------------------------------- records
@dataclass
class GenerationRecord:
    """One validated (prompt, chosen image, rejected image) record, images not yet tokenised."""

    prompt: str
    chosen: Any  # a Path, or a PIL image (datasets `Image` column)
    rejected: Any
    where: str  # "file:line" or "dataset row N", for messages
    chosen_tokens: list[int] | None = None
    rejected_tokens: list[int] | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class UnderstandingRecord:
    """One validated (image, question, chosen answer, rejected answer) record."""

    image: Any  # a Path or a PIL image
    question: str
    chosen: str
    rejected: str
    where: str
    meta: dict = field(default_factory=dict)


@dataclass
class PreferenceRecords:
    """What a source held: validated records of both kinds, and what was skipped (and why)."""

    source: str
    generation: list[GenerationRecord] = field(default_factory=list)
    understanding: list[UnderstandingRecord] = field(default_factory=list)
    skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.generation) + len(self.understanding)

    def extend(self, other: "PreferenceRecords"):
        self.generation += other.generation
        self.understanding += other.understanding
        self.skipped += other.skipped
        self.problems += other.problems


# ----------------------------------------------------------------------------- reading + validation
@dataclass(frozen=True)
class DatasetImage:
    """A lazy reference to an image cell of a `datasets` dataset (rows are not all held in memory)."""

    dataset: Any
    row: int
    column: str

    def fetch(self):
        return self.dataset[self.row][self.column]


def _is_pil(x) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, Image.Image)


def open_image(value, base: Path | None, where: str, name: str):
    """Open and fully decode an image given as a path (relative to `base`), PIL image or bytes dict.

    Returns a PIL RGB image or raises PreferenceDataError naming `where` and the field.
    """
    from PIL import Image, UnidentifiedImageError

    label = f"{where}: field '{name}'"
    if isinstance(value, DatasetImage):
        value = value.fetch()
    if _is_pil(value):
        try:
            value.load()
            return value.convert("RGB")
        except (OSError, ValueError) as e:
            raise PreferenceDataError(f"{label}: corrupt image: {e}") from None
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):  # datasets Image(decode=False)
        if value.get("bytes"):
            try:
                with Image.open(io.BytesIO(value["bytes"])) as im:
                    im.load()
                    return im.convert("RGB")
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise PreferenceDataError(f"{label}: corrupt image bytes: {e}") from None
        value = value["path"]
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise PreferenceDataError(f"{label}: expected an image path (string), got {type(value).__name__}")
    path = Path(value)
    if not path.is_absolute():
        if base is None:
            raise PreferenceDataError(f"{label}: relative image path {str(value)!r} has no directory to "
                                      "resolve against (use absolute paths or Image columns)")
        path = base / path
    if not path.is_file():
        raise PreferenceDataError(f"{label}: image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # decode every byte now: a truncated file fails here, not mid-training
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise PreferenceDataError(f"{label}: corrupt or unreadable image {path}: {e}") from None


def _need_str(rec: dict, key: str, where: str) -> str:
    if key not in rec or rec[key] is None:
        raise PreferenceDataError(f"{where}: field '{key}' is missing")
    v = rec[key]
    if not isinstance(v, str):
        raise PreferenceDataError(f"{where}: field '{key}' must be a string, got {type(v).__name__} {v!r:.60}")
    if not v.strip():
        raise PreferenceDataError(f"{where}: field '{key}' is empty")
    return v


def _image_value(rec: dict, key: str, where: str):
    if key not in rec or rec[key] is None:
        raise PreferenceDataError(f"{where}: field '{key}' is missing")
    return rec[key]


def _token_list(rec: dict, key: str, where: str) -> list[int] | None:
    if rec.get(key) is None:
        return None
    v = rec[key]
    if hasattr(v, "tolist"):
        v = v.tolist()
    if not isinstance(v, list) or not v or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise PreferenceDataError(f"{where}: field '{key}' must be a non-empty list of integers (VQ token ids)")
    return v


def record_kind(rec: dict, where: str) -> str:
    kind = rec.get("kind")
    if kind is not None:
        if kind not in (GENERATION, UNDERSTANDING):
            raise PreferenceDataError(f"{where}: field 'kind' must be '{GENERATION}' or '{UNDERSTANDING}', "
                                      f"got {kind!r}")
        return kind
    has_prompt, has_question = rec.get("prompt") is not None, rec.get("question") is not None
    if has_prompt and has_question:
        raise PreferenceDataError(f"{where}: record has both 'prompt' and 'question'; add "
                                  f"\"kind\": \"{GENERATION}\" or \"{UNDERSTANDING}\"")
    if has_prompt:
        return GENERATION
    if has_question:
        return UNDERSTANDING
    raise PreferenceDataError(f"{where}: field 'prompt' (generation pair) or 'question' (understanding pair) "
                              "is missing")


_GEN_KEYS = {"kind", "prompt", "chosen", "rejected", "chosen_tokens", "rejected_tokens"}
_UND_KEYS = {"kind", "image", "question", "chosen", "rejected"}


def parse_record(rec, where: str, base: Path | None, check_images: bool = True):
    """Validate one raw record (a dict) into a GenerationRecord or UnderstandingRecord."""
    if not isinstance(rec, dict):
        raise PreferenceDataError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    kind = record_kind(rec, where)
    if kind == GENERATION:
        prompt = _need_str(rec, "prompt", where)
        imgs = {}
        for k in ("chosen", "rejected"):
            v = _image_value(rec, k, where)
            if check_images:
                open_image(v, base, where, k)  # raises with file/line/field
            imgs[k] = v if _is_pil(v) else _resolve(v, base)
        return GenerationRecord(
            prompt=prompt, chosen=imgs["chosen"], rejected=imgs["rejected"], where=where,
            chosen_tokens=_token_list(rec, "chosen_tokens", where),
            rejected_tokens=_token_list(rec, "rejected_tokens", where),
            meta={k: v for k, v in rec.items() if k not in _GEN_KEYS})
    question = _need_str(rec, "question", where)
    chosen, rejected = _need_str(rec, "chosen", where), _need_str(rec, "rejected", where)
    img = _image_value(rec, "image", where)
    if check_images:
        open_image(img, base, where, "image")
    return UnderstandingRecord(image=img if _is_pil(img) else _resolve(img, base), question=question,
                               chosen=chosen, rejected=rejected, where=where,
                               meta={k: v for k, v in rec.items() if k not in _UND_KEYS})


def _resolve(value, base: Path | None):
    if isinstance(value, dict):  # datasets Image(decode=False): keep bytes as they are
        return value
    p = Path(value)
    # absolute, so that later loads do not depend on the working directory or on `base`
    return p if p.is_absolute() or base is None else Path(os.path.abspath(base / p))


def _collect(records: PreferenceRecords, items, skip_invalid: bool, check_images: bool):
    """items: iterable of (where, base, raw record or a PreferenceDataError, (dataset, row) or None)."""
    for where, base, raw, origin in items:
        try:
            if isinstance(raw, PreferenceDataError):
                raise raw
            r = parse_record(raw, where, base, check_images)
        except PreferenceDataError as e:
            if not skip_invalid:
                raise
            records.skipped += 1
            records.problems.append(str(e))
            continue
        if origin is not None:  # in-memory images of a dataset row: keep a lazy reference instead
            names = ("chosen", "rejected") if isinstance(r, GenerationRecord) else ("image",)
            for name in names:
                if not isinstance(getattr(r, name), Path):
                    setattr(r, name, DatasetImage(origin[0], origin[1], name))
        (records.generation if isinstance(r, GenerationRecord) else records.understanding).append(r)


def _jsonl_items(path: Path):
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                yield where, path.parent, json.loads(line), None
            except json.JSONDecodeError as e:
                err = PreferenceDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
                yield where, path.parent, err, None


def _dataset_items(ds, name: str, base: Path | None):
    for i, row in enumerate(ds):
        yield f"{name} row {i}", base, dict(row), (ds, i)


def is_saved_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ("dataset_info.json", "dataset_dict.json", "state.json"))


def read_preference_records(source: str | os.PathLike, split: str = "train", skip_invalid: bool = False,
                            check_images: bool = True) -> PreferenceRecords:
    """Read and validate every record of a JSONL file, a saved `datasets` directory or a hub id.

    A directory holding `pairs.jsonl` (what `uniloop pairs` writes) is read as that JSONL file.
    Raises PreferenceDataError on the first bad record unless `skip_invalid`.
    """
    src = str(source)
    path = Path(src).expanduser()
    records = PreferenceRecords(source=src)
    if path.is_dir() and (path / JSONL_NAME).is_file() and not is_saved_dataset_dir(path):
        path = path / JSONL_NAME
    if path.is_file():
        if path.suffix not in (".jsonl", ".json"):
            raise PreferenceDataError(f"{path}: preference data must be a .jsonl file (one JSON record per line), "
                                      "a `datasets` directory (save_to_disk) or a hub dataset id")
        _collect(records, _jsonl_items(path), skip_invalid, check_images)
    elif is_saved_dataset_dir(path):
        from datasets import DatasetDict, load_from_disk
        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise PreferenceDataError(f"{path}: split {split!r} not found; splits: {sorted(ds)}")
            ds = ds[split]
        _collect(records, _dataset_items(ds, str(path), path), skip_invalid, check_images)
    elif path.exists():
        raise PreferenceDataError(f"{path}: a directory without {JSONL_NAME} and not a saved `datasets` dataset")
    elif "/" in src and not src.startswith((".", "/", "~")) and src.count("/") == 1 and not Path(src).suffix:
        from datasets import load_dataset  # a hub id, e.g. "user/my-pairs" (needs network on first use)
        try:
            ds = load_dataset(src, split=split)
        except Exception as e:  # name what was tried: it may just be a mistyped local path
            raise PreferenceDataError(f"{src}: no such local file or directory, and loading it as a hub "
                                      f"dataset (split {split!r}) failed: {type(e).__name__}: {e}") from None
        _collect(records, _dataset_items(ds, src, None), skip_invalid, check_images)
    else:
        raise PreferenceDataError(f"{src}: preference data not found (a .jsonl file, a `datasets` directory, "
                                  "or a hub id such as user/name)")
    if not len(records) and not records.skipped:
        raise PreferenceDataError(f"{src}: no preference records")
    if records.skipped:
        warnings.warn(f"{src}: skipped {records.skipped} invalid record(s) of {len(records) + records.skipped}; "
                      f"first: {records.problems[0]}", stacklevel=2)
    return records


# ----------------------------------------------------------------------------- images -> tensors / tokens
def pil_to_tensor(im, size: int | None) -> torch.Tensor:
    """PIL RGB -> (size, size, 3) float in [0, 1]: centre-cropped to a square, resized (bicubic)."""
    import numpy as np
    from PIL import Image

    if size:
        w, h = im.size
        if w != h:  # generators draw squares: crop the centre rather than distort the content
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).float() / 255


def load_image_tensor(value, size: int | None, where: str, name: str) -> torch.Tensor:
    return pil_to_tensor(open_image(value, None, where, name), size)


def _save_png(img: torch.Tensor, path: Path):
    from PIL import Image
    arr = (img.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@dataclass
class PairToWrite:
    """One pair for `write_preference_jsonl`: images as (H, W, 3) tensors in [0, 1]."""

    kind: str
    chosen: Any  # generation: image tensor; understanding: answer text
    rejected: Any
    prompt: str = ""  # generation prompt, or the question of an understanding pair
    image: torch.Tensor | None = None  # understanding: the image asked about
    chosen_tokens: list[int] | None = None
    rejected_tokens: list[int] | None = None
    meta: dict = field(default_factory=dict)


def write_preference_jsonl(pairs: list[PairToWrite], out_dir: str | os.PathLike) -> Path:
    """Write pairs in the documented format: `out_dir/pairs.jsonl` + PNGs under `out_dir/images/`.

    Written to a temporary file and renamed, so a killed run leaves either no file or a whole one.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, p in enumerate(pairs):
        if p.kind == GENERATION:
            rec = {"prompt": p.prompt}
            for side in ("chosen", "rejected"):
                rel = f"images/{i:06d}_{side}.png"
                _save_png(getattr(p, side), out / rel)
                rec[side] = rel
            if p.chosen_tokens is not None:
                rec["chosen_tokens"] = [int(t) for t in p.chosen_tokens]
                rec["rejected_tokens"] = [int(t) for t in p.rejected_tokens]
        else:
            rel = f"images/{i:06d}_image.png"
            _save_png(p.image, out / rel)
            rec = {"image": rel, "question": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
        for k, v in p.meta.items():
            if k in rec:
                raise ValueError(f"meta key {k!r} clashes with a format field")
            rec[k] = v
        lines.append(json.dumps(rec))
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".pairs_", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("".join(ln + "\n" for ln in lines))
    os.replace(tmp, out / JSONL_NAME)
    return out / JSONL_NAME


# ----------------------------------------------------------------------------- train / held-out split
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
