"""Open-vocabulary detector reward, GenEval style: object presence, counts, colors and relative positions.

The detector is a transformers OWLv2 / OWL-ViT (`google/owlv2-base-patch16-ensemble`, `-large-`) asked
for every class the sample's metadata names (query `query_template.format(class)`). Its raw outputs
go through the processor's own `post_process_grounded_object_detection`; the kept boxes are then
selected and judged by `geneval.py` (GenEval's rules). Per-sample metadata (format in geneval.py) is
a JSON string in `batch.targets` (what a rollout job's `target` field carries), or, for prompts whose
target is not metadata, the entry of the prompt in `metadata_file` (a JSONL with `prompt` fields, such
as GenEval's `evaluation_metadata.jsonl`); a sample with neither is invalid, never 0.

Differences from GenEval: GenEval detects with Mask2Former (closed-vocabulary COCO classes, instance
masks, threshold 0.3 / 0.9 for counting); here an open-vocabulary detector with its own score scale
(defaults 0.2 / 0.3, tune them for your checkpoint), NMS at IoU 0.5 because OWL returns one box per
image patch, and no masks: the color of an object is classified by CLIP zero-shot on the box crop
(GenEval also greys out the background with the mask). The color classifier is GenEval's: CLIP
ViT-L/14 (`openai/clip-vit-large-patch14`, the transformers port of GenEval's open_clip `ViT-L-14`
openai weights), the 10 GenEval colors, templates "a photo of a {c} {class}", "a photo of a
{c}-colored {class}", "a photo of a {c} object" (normalised text embeddings averaged, renormalised),
argmax of cosine. It is loaded only when a color clause first needs it. GroundingDINO is not wired
(its processor takes one "a. b." prompt and a text threshold): model types other than OWL raise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Reward, RewardContext, RewardOutput, register_reward
from .geneval import (COLORS, Detection, evaluate, metadata_classes, parse_metadata, read_metadata_file,
                      select_detections)
from .model_utils import chunks, pooled, split_images, to_pil, torch_dtype

COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")


class ClipColorClassifier:
    """GenEval's zero-shot color classifier on box crops, with a transformers CLIP."""

    def __init__(self, model: str, processor: str | None, device: str, dtype: str):
        from .pickscore import load_clip

        self.model, self.processor = load_clip(model, processor, device, dtype)
        self.device, self.heads = device, {}

    @torch.no_grad()
    def head(self, cls: str) -> torch.Tensor:
        """(D, 10) class embeddings of the colors for objects of class `cls` (cached per class)."""
        if cls not in self.heads:
            cols = []
            for c in COLORS:
                texts = [t.format(c=c, cls=cls) for t in COLOR_TEMPLATES]
                tok = self.processor(text=texts, padding=True, return_tensors="pt")
                tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
                emb = F.normalize(pooled(self.model.get_text_features(**tok)).float(), dim=-1).mean(0)
                cols.append(F.normalize(emb, dim=-1))
            self.heads[cls] = torch.stack(cols, dim=1)
        return self.heads[cls]

    @torch.no_grad()
    def __call__(self, image, dets: list[Detection], cls: str) -> list[str]:
        """A color name for each detection of `cls` in the PIL `image`."""
        W, H = image.size
        crops = []
        for d in dets:
            x0, y0 = max(0, int(d.box[0])), max(0, int(d.box[1]))
            x1, y1 = min(W, max(x0 + 1, int(round(d.box[2])))), min(H, max(y0 + 1, int(round(d.box[3]))))
            crops.append(image.crop((x0, y0, x1, y1)))
        dtype = next(self.model.parameters()).dtype
        px = self.processor(images=crops, return_tensors="pt")["pixel_values"].to(self.device, dtype)
        img = F.normalize(pooled(self.model.get_image_features(pixel_values=px)).float(), dim=-1)
        return [COLORS[i] for i in (img @ self.head(cls)).argmax(dim=1).tolist()]


@register_reward("detector")
class DetectorReward(Reward):
    """GenEval-style reward from an open-vocabulary detector; metadata JSON in `batch.targets`.

    mode: `strict` (1 if every clause holds, else 0: GenEval's correct) or `partial` (fraction of clauses).
    """

    modalities = ("image",)

    def __init__(self, model: str = "google/owlv2-base-patch16-ensemble", processor: str | None = None,
                 device: str = "cpu", dtype: str = "float32", batch_size: int = 4, threshold: float = 0.2,
                 counting_threshold: float = 0.3, nms_iou: float = 0.5, max_objects: int = 16,
                 position_threshold: float = 0.1, query_template: str = "a photo of a {}", mode: str = "strict",
                 color_model: str = "openai/clip-vit-large-patch14", color_processor: str | None = None,
                 metadata_file: str | None = None):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        if mode not in ("strict", "partial"):
            raise ValueError(f"detector mode must be 'strict' or 'partial', got {mode!r}")
        self.processor = AutoProcessor.from_pretrained(processor or model)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(model, dtype=torch_dtype(dtype))
        self.model.to(device).eval().requires_grad_(False)
        self.kind = self.model.config.model_type
        if self.kind not in ("owlv2", "owlvit"):
            raise NotImplementedError(f"detector: only OWLv2 / OWL-ViT checkpoints are supported, got {self.kind!r}")
        self.device, self.dtype_name, self.batch_size, self.mode = device, dtype, batch_size, mode
        self.threshold, self.counting_threshold = threshold, counting_threshold
        self.nms_iou, self.max_objects, self.position_threshold = nms_iou, max_objects, position_threshold
        self.query_template = query_template
        self.color_model, self.color_processor, self._colors = color_model, color_processor, None
        self.by_prompt = read_metadata_file(metadata_file) if metadata_file else {}

    def metadata(self, batch, i: int) -> tuple[dict | None, str | None]:
        """The sample's metadata: its `targets` entry when that parses, else the `metadata_file` entry of
        its prompt (training image tasks carry a color word, not metadata, in `targets`)."""
        target = batch.targets[i] if batch.targets and i < len(batch.targets) else None
        meta, err = parse_metadata(target) if target else (None, "no metadata in targets")
        if meta is None and batch.prompts[i] in self.by_prompt:
            return self.by_prompt[batch.prompts[i]], None
        return meta, err

    def colors(self) -> ClipColorClassifier:
        if self._colors is None:  # lazy: many runs have no color clause at all
            self._colors = ClipColorClassifier(self.color_model, self.color_processor, self.device, self.dtype_name)
        return self._colors

    @torch.no_grad()
    def detect(self, pil_images: list, queries: list[list[str]], thresholds: list[float]) -> list[dict]:
        """Post-processed detections per image: {"scores", "labels" (index into its queries), "boxes"}.

        Images of one chunk share a forward; the processor pads shorter query lists with " ", which
        is a real query to OWL, so each image's logits are cut to its own queries before the
        post-processing: a sample's detections do not depend on its batch mates."""
        results = []
        dtype = next(self.model.parameters()).dtype
        for sl in chunks(len(pil_images), self.batch_size):
            imgs, qs = pil_images[sl], queries[sl]
            inputs = self.processor(text=qs, images=imgs, return_tensors="pt", truncation=True)
            inputs = {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                      for k, v in inputs.items()}
            out = self.model(**inputs)
            for j, (img, q) in enumerate(zip(imgs, qs)):
                W, H = img.size
                # OWLv2 pads to a square (bottom/right) before resizing, so boxes are relative to the
                # padded square; OWL-ViT resizes the image itself
                size = (max(H, W), max(H, W)) if self.kind == "owlv2" else (H, W)
                one = type(out)(logits=out.logits[j:j + 1, :, :len(q)].float(), pred_boxes=out.pred_boxes[j:j + 1].float())
                r = self.processor.post_process_grounded_object_detection(one, threshold=thresholds[sl][j],
                                                                          target_sizes=[size])[0]
                boxes = r["boxes"].clone()
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
                results.append({"scores": r["scores"].cpu(), "labels": r["labels"].cpu(), "boxes": boxes.cpu()})
        return results

    def objects(self, det: dict, classes: list[str], threshold: float) -> dict[str, list[Detection]]:
        """Detections grouped by class and selected by GenEval's rules (sort, threshold, cap, NMS)."""
        by_class: dict[str, list[Detection]] = {c: [] for c in classes}
        for s, lab, box in zip(det["scores"].tolist(), det["labels"].tolist(), det["boxes"].tolist()):
            by_class[classes[lab]].append(Detection(tuple(box), s))
        out = {c: select_detections(d, threshold, self.max_objects, self.nms_iou) for c, d in by_class.items()}
        return {c: d for c, d in out.items() if d}

    def score(self, batch, context: RewardContext) -> RewardOutput:
        B = len(batch)
        images, ok = split_images(batch.images)
        metas, errors = map(list, zip(*[self.metadata(batch, i) for i in range(B)])) if B else ([], [])
        todo = [i for i in range(B) if ok[i] and metas[i] is not None]
        pils = to_pil(images[todo]) if todo else []
        classes = [metadata_classes(metas[i]) for i in todo]
        thr = [self.counting_threshold if metas[i].get("tag") == "counting" else self.threshold for i in todo]
        dets = self.detect(pils, [[self.query_template.format(c) for c in cl] for cl in classes], thr)
        scores = torch.full((B,), float("nan"))
        reasons: list = [e if ok[i] else "non-finite pixels" for i, e in enumerate(errors)]
        for k, i in enumerate(todo):
            objs = self.objects(dets[k], classes[k], thr[k])
            v = evaluate(objs, metas[i], lambda d, c, img=pils[k]: self.colors()(img, d, c), self.position_threshold)
            scores[i] = float(v.correct) if self.mode == "strict" else v.partial
            reasons[i] = "; ".join(v.reasons)
        return RewardOutput(scores, torch.isfinite(scores), details={"geneval_reason": reasons})
