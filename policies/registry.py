"""Policy families: which class wraps which checkpoint, and the one rule for tiny offline models.

A family is a policy class registered under a name (`register_policy`), with the `model_type`s of
the checkpoints it loads and, optionally, a builder of a tiny random checkpoint for tests and
quickstarts. A `PolicySpec` is the small, picklable description of a policy that every layer above
passes around (the learner builds its policy from it, Ray rollout actors build their copies from
it): family, checkpoint, loading options, adapter.

The tiny rule lives here and nowhere else: `name_or_path: tiny` (or `tiny-<family>`, e.g. `tiny-emu3`,
which also picks the family) builds the family's tiny model
with the run's seed into `tiny_dir` (once; a build with the same settings is reused) and loads it
back through `from_pretrained`, the code path a hub id takes.

    spec = PolicySpec("janus", "deepseek-community/Janus-Pro-1B", load={"dtype": "bfloat16"},
                      lora=LoraSpec(r=16))
    policy = build_policy(spec)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .flow import FlowPolicy
from .flow_tiny import build_tiny_sd3
from .emu3 import Emu3Policy
from .emu3_tiny import build_tiny_emu3
from .janus import JanusPolicy
from .tiny import build_tiny_janus

TINY = "tiny"  # the name_or_path that asks for the family's tiny model; `tiny-<family>` names the family


def is_tiny(name_or_path: str) -> bool:
    return name_or_path == TINY or name_or_path.startswith(TINY + "-")


class Registry(dict):
    """A name -> object table filled by a decorator. Every registry of uniloop is one (policy families
    here, rewards, algorithms, losses): registering a second object under a taken name is an error,
    and looking up an unknown name lists the registered ones."""

    def __init__(self, what: str, name_attr: str | None = None):
        super().__init__()
        self.what, self.name_attr = what, name_attr  # name_attr: set on each entry to the name it has

    def add(self, name: str, obj):
        if name in self and self[name] != obj:  # re-registering the same entry (a re-import) is fine
            raise ValueError(f"{self.what} {name!r} is already registered")
        self[name] = obj
        if self.name_attr:
            setattr(obj, self.name_attr, name)
        return obj

    def register(self, name: str):
        """Decorator: `@REGISTRY.register("name")` on a class or function."""
        return lambda obj: self.add(name, obj)

    def lookup(self, name: str, key: str | None = None):
        if name not in self:
            raise ValueError(f"unknown {key or self.what} {name!r}; registered: {sorted(self)}")
        return self[name]


@dataclass
class PolicyFamily:
    name: str
    cls: type
    model_types: tuple[str, ...] = ()  # `model_type` in config.json (or `_class_name` in model_index.json)
    tiny: Callable | None = None  # builder(path, seed=..., **overrides) -> Path of a tiny checkpoint


_FAMILIES = Registry("policy family")


def register_policy(name: str, model_types: tuple[str, ...] = (), tiny: Callable | None = None):
    """Class decorator: make a policy class available as `model.family: <name>` (and picked
    automatically for checkpoints whose `model_type` is in `model_types`)."""
    def wrap(cls):
        _FAMILIES.add(name, PolicyFamily(name, cls, tuple(model_types), tiny))
        return cls
    return wrap


def policy_families() -> dict[str, PolicyFamily]:
    return dict(_FAMILIES)


def get_family(name: str) -> PolicyFamily:
    return _FAMILIES.lookup(name)


@dataclass
class LoraSpec:
    """The adapter to put on the policy: a fresh LoRA, or a saved PEFT adapter to start from."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] | None = None  # None = the family's default
    init_adapter: str | None = None  # a PEFT adapter directory to load instead of a fresh adapter


@dataclass
class PolicySpec:
    """Everything needed to build one policy; small and picklable (Ray actors receive it)."""

    family: str  # a registered family (janus, sd3, ...)
    name_or_path: str  # hub id, local directory, or `tiny`
    load: dict = field(default_factory=dict)  # keyword arguments of the class's from_pretrained
    lora: LoraSpec | None = None
    gradient_checkpointing: bool = False
    tiny: dict = field(default_factory=dict)  # overrides of the tiny model's shape
    tiny_dir: str = ""  # where `tiny` is built
    seed: int = 0  # the seed a tiny model is built with


def resolve_checkpoint(spec: PolicySpec) -> PolicySpec:
    """The same spec with `tiny` built and replaced by its directory (absolute, so processes with
    other working directories, such as Ray actors, load the same files); other specs unchanged."""
    if not is_tiny(spec.name_or_path):
        return spec
    family = get_family(spec.family)
    if family.tiny is None:
        raise ValueError(f"policy family {spec.family!r} has no tiny model: give model.name_or_path")
    if not spec.tiny_dir:
        raise ValueError("a tiny policy needs tiny_dir (where to build it)")
    path = family.tiny(spec.tiny_dir, seed=spec.seed, **spec.tiny)
    return replace(spec, name_or_path=str(Path(path).absolute()))


def build_policy(spec: PolicySpec):
    """Load the policy `spec` describes, with its adapter (fresh or loaded) and checkpointing."""
    spec = resolve_checkpoint(spec)
    policy = get_family(spec.family).cls.from_pretrained(spec.name_or_path, **spec.load)
    lora = spec.lora
    if lora is not None:
        if lora.init_adapter:
            policy.load_adapter(lora.init_adapter, trainable=True)
        else:
            kwargs = {} if lora.target_modules is None else {"target_modules": lora.target_modules}
            policy.add_lora(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, **kwargs)
    if spec.gradient_checkpointing:
        policy.gradient_checkpointing(True)
    return policy


def detect_family(name_or_path: str) -> str | None:
    """The registered family of a local checkpoint directory, from its config.json `model_type` (or a
    diffusers pipeline's model_index.json `_class_name`); None when it cannot be told offline."""
    if name_or_path.startswith(TINY + "-") and name_or_path[len(TINY) + 1:] in _FAMILIES:
        return name_or_path[len(TINY) + 1:]
    p = Path(name_or_path)
    for fname, key in (("config.json", "model_type"), ("model_index.json", "_class_name")):
        f = p / fname
        if f.is_file():
            try:
                value = json.loads(f.read_text()).get(key)
            except (OSError, ValueError):
                return None
            for fam in _FAMILIES.values():
                if value in fam.model_types:
                    return fam.name
    return None


register_policy("janus", model_types=("janus",), tiny=build_tiny_janus)(JanusPolicy)
register_policy("emu3", model_types=("emu3",), tiny=build_tiny_emu3)(Emu3Policy)
register_policy("sd3", model_types=("StableDiffusion3Pipeline",), tiny=build_tiny_sd3)(FlowPolicy)
