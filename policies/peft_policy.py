"""What every transformers policy with a PEFT adapter shares (Janus, Emu3, the next family).

The part of the policy protocol that does not depend on how a model generates: the adapter's
lifecycle (add, load, state dict in and out, save), the reference model (the adapter disabled: no
second copy), gradient checkpointing of the language model, and fingerprints that say whether two
policies tokenise images and score tokens alike (cache keys). A family subclasses `PeftPolicy` and
writes its sampling, teacher forcing and understanding (see policies/janus.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import warnings
from pathlib import Path

import torch


class PeftPolicy:
    """Subclasses set `self.model` (the transformers model, or the PeftModel around it), `self.tokenizer`,
    `self.device`, `self.version`, and `language_model_path` (the module LoRA and checkpointing act on)."""

    modalities: tuple[str, ...] = ("image", "text")

    @staticmethod
    def load_frozen(model_cls, processor_cls, name_or_path, dtype, device, quantization: str | None,
                    attn_implementation: str | None, skip_modules: list[str]):
        """(processor, frozen model in eval mode) from a hub id or local directory; `quantization: 4bit`
        puts the base in NF4 (bitsandbytes) except `skip_modules` (full module paths: transformers 5.x
        matches them from the start of the name)."""
        kwargs = {"dtype": dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if quantization == "4bit":
            from transformers import BitsAndBytesConfig
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                llm_int8_skip_modules=list(skip_modules))
            kwargs["device_map"] = {"": str(device)}
        elif quantization:
            raise ValueError(f"quantization must be null or '4bit', got {quantization!r}")
        processor = processor_cls.from_pretrained(str(name_or_path))
        model = model_cls.from_pretrained(str(name_or_path), **kwargs)
        if not quantization:
            model.to(device)
        else:
            same_4bit_kernel_everywhere(model)
        model.eval()
        model.requires_grad_(False)
        return processor, model

    @property
    def base(self):
        """The transformers model inside (adapters, if any, are injected in it)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    language_model_path = "model.language_model"  # where LoRA and gradient checkpointing act, in `base`

    @property
    def language_model(self):
        return operator.attrgetter(self.language_model_path)(self.base)

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.model, "peft_config")

    def attach_lora(self, r: int, alpha: int, dropout: float, target_modules):
        """A fresh LoRA adapter (B = 0: the policy starts equal to the reference) on `target_modules`."""
        from peft import LoraConfig, get_peft_model

        if self.has_adapter:
            raise RuntimeError("this policy already has an adapter")
        if getattr(self.base, "is_loaded_in_4bit", False):
            from peft import prepare_model_for_kbit_training
            self.model = prepare_model_for_kbit_training(self.model, use_gradient_checkpointing=False)
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                            init_lora_weights=True)
        with warnings.catch_warnings():  # PEFT asks transformers' deprecated `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.model = get_peft_model(self.model, config)
        return self

    def load_adapter(self, path: str | Path, trainable: bool = True):
        """Attach a saved PEFT adapter (standard `adapter_config.json` + safetensors)."""
        from peft import PeftModel

        with warnings.catch_warnings():  # PEFT asks transformers' deprecated `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.model = PeftModel.from_pretrained(self.model, str(path), is_trainable=trainable)
        self.model.to(self.device)
        return self

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def set_adapter_state_dict(self, state: dict[str, torch.Tensor], version: int | None = None):
        from peft import set_peft_model_state_dict
        result = set_peft_model_state_dict(self.model, state)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise ValueError(f"adapter tensors do not fit this policy: {unexpected[:3]}...")
        if version is not None:
            self.version = version

    def save_adapter(self, path: str | Path):
        self.model.save_pretrained(str(path))

    def save_merged(self, path: str | Path) -> Path:
        """Write the model with the adapter merged into the base weights, and the processor, with
        `save_pretrained`: a checkpoint plain transformers loads (`<Family>ForConditionalGeneration.
        from_pretrained`), no PEFT and no uniloop. The merge is in place: the policy has no adapter after."""
        if getattr(self.base, "is_loaded_in_4bit", False):
            raise ValueError("cannot merge into a 4-bit base: load the model unquantized (model.quantization: null)")
        if self.has_adapter:
            self.model = self.model.merge_and_unload()
        self.model.save_pretrained(str(path))
        self.processor.save_pretrained(str(path))
        return Path(path)

    def load_adapter_weights(self, path: str | Path, version: int | None = None):
        """Replace the current adapter's tensors with those saved in `path` (a checkpoint's adapter/)."""
        from safetensors.torch import load_file
        self.set_adapter_state_dict(load_file(str(Path(path) / "adapter_model.safetensors")), version)

    def reference(self):
        """Context in which the model is the frozen base: the adapter disabled (no second copy), or, when
        the weights themselves train (`freeze_reference`), their pre-training values swapped in."""
        if self.has_adapter:
            return self.model.disable_adapter()
        frozen = getattr(self, "_frozen_reference", None)
        return frozen.swapped() if frozen is not None else contextlib.nullcontext()

    def freeze_reference(self):
        """Full fine-tuning: keep the trainable tensors' current values (on a sharded model this process's
        shards only) as the reference model's, for KL and DPO terms."""
        self._frozen_reference = FrozenTensors([p for p in self.model.parameters() if p.requires_grad],
                                               list(self.model.modules()))

    def gradient_checkpointing(self, enable: bool = True):
        lm = self.language_model
        if enable:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if self.has_adapter:
                self.model.enable_input_require_grads()
        else:
            lm.gradient_checkpointing_disable()

    def vq_fingerprint(self) -> str:
        """Identifies the image tokenizer: same key -> same tokens for the same image bytes (its config
        and, cheaply, a few of its weights: `vq_weights`)."""
        cfg = self.base.config
        return fingerprint(str(getattr(cfg, "_name_or_path", "")), cfg.vq_config.to_dict(), *self.vq_weights())

    def vq_weights(self) -> tuple:
        raise NotImplementedError

    def yes_no_ids(self) -> tuple[list[int], list[int]]:
        """The single-token spellings of "yes" and "no" in the tokenizer (for `yes_probability`)."""
        def ids(words):
            out = set()
            for w in words:
                enc = self.tokenizer.encode(w, add_special_tokens=False)
                if enc and enc[0] != self.tokenizer.unk_token_id:
                    out.add(enc[0])
            return sorted(out)
        yes, no = ids(["yes", "Yes", " yes", " Yes", "YES"]), ids(["no", "No", " no", " No", "NO"])
        if not yes or not no:
            raise ValueError("the tokenizer has no single token for 'yes' / 'no'")
        return yes, no


def same_4bit_kernel_everywhere(model):
    """Keep bitsandbytes on one 4-bit kernel for sampling and for teacher forcing.

    On CPUs with AVX512-BF16 (recent Intel Xeons, AMD Zen 4) bitsandbytes repacks a Linear4bit's
    weight the first time it runs in eval mode without grad, with its absmax in bfloat16, and from
    then on computes every product, the training ones included, with that kernel, which has no
    autograd formula (gradients to earlier layers are dropped). Sampling (eval, no grad) and the
    learner (train, grad) would then see different weights, 5e-3 nats apart on the tiny model,
    on some CPUs only. Turning the repacking off keeps the dequantize + matmul path on every CPU;
    CUDA never takes this path."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def fingerprint(*parts) -> str:
    """A short hash of strings, JSON-able values and tensors (cache keys: same key, same model part)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.detach().float().cpu().numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def _local(p: torch.Tensor) -> torch.Tensor:
    """A parameter's own storage: the local shard of a DTensor (FSDP2), else the tensor."""
    return p.to_local() if hasattr(p, "to_local") else p


class FrozenTensors:
    """A copy of some parameters' values, swapped in place (`with frozen.swapped():`) and back: the
    reference model of a full fine-tuning run at the cost of one copy of the trained tensors (shards).

    FSDP2 units that were called without an FSDP parent keep their gathered parameters after a
    forward; they are resharded before and after the swap, so the next forward gathers the values
    actually in the shards (the reference inside the block, the trained ones after it)."""

    def __init__(self, params: list[torch.Tensor], modules: list[torch.nn.Module] = ()):
        self.params = params
        self.sharded = [m for m in modules if callable(getattr(m, "reshard", None))]  # FSDPModule units
        with torch.no_grad():
            self.values = [_local(p).detach().clone() for p in params]

    def _reshard(self):
        for m in self.sharded:
            m.reshard()

    @contextlib.contextmanager
    def swapped(self):
        self._reshard()
        with torch.no_grad():
            current = [_local(p).detach().clone() for p in self.params]
            for p, v in zip(self.params, self.values):
                _local(p).copy_(v)
        try:
            yield
        finally:
            self._reshard()
            with torch.no_grad():
                for p, v in zip(self.params, current):
                    _local(p).copy_(v)
