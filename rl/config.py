"""Typed run configuration: YAML recipes -> dataclasses, with errors that name file, line and key.

Every field carries a help text (`uf(default, "help")`); `uniloop config-help` prints them all.
`--set a.b=value` overrides are applied before validation, so they are checked like the file.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


def uf(default=dataclasses.MISSING, help: str = "", choices=None, factory=None):
    """A dataclass field with help text (and optional allowed values)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    name_or_path: str = uf("tiny", "Hub id (deepseek-community/Janus-Pro-1B) or local directory of a Janus "
                           "checkpoint; `tiny` builds a tiny random Janus offline (tests, quickstart).")
    tiny_dir: str = uf("", "Where the tiny model is written when name_or_path is `tiny` "
                       "(default: <output_dir>/tiny_model).")
    tiny: dict = uf(help="Overrides of the tiny model's shape (hidden_size, num_layers, image_size, ...).",
                    factory=dict)
    dtype: str = uf("float32", "Weights dtype.", choices=["float32", "bfloat16", "float16"])
    device: str = uf("cpu", "Device of the policy in the driver / in-process worker (cpu, cuda, cuda:1).")
    quantization: str | None = uf(None, "null, or `4bit` for a bitsandbytes NF4 base under the LoRA adapter (QLoRA).",
                                  choices=[None, "4bit"])
    gradient_checkpointing: bool = uf(False, "Recompute activations in the backward pass (saves memory).")
    attn_implementation: str | None = uf(None, "transformers attention implementation (sdpa, eager, ...).")


@dataclass
class LoraSection:
    r: int = uf(16, "LoRA rank.")
    alpha: int = uf(32, "LoRA alpha (scale = alpha / r).")
    dropout: float = uf(0.0, "LoRA dropout.")
    target_modules: str = uf(r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
                             "Regex (or comma-separated names) of the modules that get adapters; the default "
                             "keeps them on the language model, away from SigLIP.")
    init_adapter: str | None = uf(None, "Start from a saved PEFT adapter directory instead of a fresh one.")


@dataclass
class RolloutConfig:
    num_generations: int = uf(8, "Samples per prompt (the GRPO group size), as in TRL.")
    cfg_scale: float = uf(5.0, "Classifier-free guidance scale for image sampling (<= 1 disables CFG).")
    temperature: float = uf(1.0, "Sampling temperature (0 = greedy).")
    top_k: int = uf(0, "Top-k filter for image tokens (0 = off).")
    sampler: str = uf("auto", "Image sampler: `auto` (the fast static-cache/CUDA-graph sampler on CUDA, the "
                      "plain loop on CPU), `plain` or `fast`. Same computation: bit-identical on CPU and in "
                      "float32; bf16 GPU samples drift apart after ~100 tokens (kernel rounding; BENCHMARKS.md).",
                      choices=["auto", "plain", "fast"])
    max_new_tokens: int = uf(16, "Maximum answer length for text (understanding) rollouts.")
    logprob_mode: str = uf("cfg", "Which image distribution the ratio is computed on: `cfg` (the guided one "
                           "sampled from) or `conditional` (conditional branch only, T2I-R1 style).",
                           choices=["cfg", "conditional"])
    batch_size: int = uf(64, "Samples generated per forward batch inside a worker.")
    num_workers: int = uf(0, "Ray rollout actors (0 = sample in-process, no Ray).")
    num_gpus_per_worker: float = uf(0.0, "GPUs per rollout actor (fractions allowed).")
    num_cpus_per_worker: float = uf(1.0, "CPUs per rollout actor.")
    max_staleness: int = uf(0, "Largest allowed gap between the learner's adapter version and a rollout's "
                            "(0 = strictly on-policy).")
    one_step_off: bool = uf(False, "Sample step k+1 while step k trains (needs num_workers > 0 and "
                             "max_staleness >= 1); the importance ratio uses the sampler's recorded log-probs.")
    max_restarts: int = uf(3, "Restarts allowed per rollout actor before the run gives up.")
    scoring_chunks: int = uf(0, "Chunks each task's rollout is sampled in, so that async rewards (judges, reward "
                             "actors; `async_scoring`) score chunk i while chunk i+1 samples. 0 = auto: one chunk "
                             "per forward batch of `batch_size` samples on every worker (at least 2) when an async "
                             "reward is configured, else 1. 1 = sample everything, then score. Chunks keep whole prompt "
                             "groups and per-sample seeds, so rewards and advantages do not change.")

    def _validate(self, prefix, src):
        if self.one_step_off and self.num_workers < 1:
            raise ConfigError(f"{src.where(f'{prefix}.one_step_off')}: key '{prefix}.one_step_off' needs "
                              f"{prefix}.num_workers >= 1 (Ray actors sample while the learner trains)")
        if self.one_step_off and self.max_staleness < 1:
            raise ConfigError(f"{src.where(f'{prefix}.one_step_off')}: key '{prefix}.one_step_off' samples with "
                              f"the previous adapter: set {prefix}.max_staleness >= 1 (it is {self.max_staleness})")
        if self.num_workers < 0 or self.max_restarts < 0 or self.max_staleness < 0:
            raise ConfigError(f"{src.where(prefix)}: {prefix}.num_workers, max_restarts and max_staleness "
                              f"must be >= 0")
        if self.scoring_chunks < 0:
            raise ConfigError(f"{src.where(f'{prefix}.scoring_chunks')}: key '{prefix}.scoring_chunks' must be "
                              f">= 0 (0 = auto), got {self.scoring_chunks}")


@dataclass
class RayConfig:
    address: str | None = uf(None, "null = start a local Ray; `auto` or host:port = join a running cluster.")
    num_cpus: int | None = uf(None, "CPUs for a local Ray (null = all).")
    temp_dir: str | None = uf(None, "Ray temp/session directory for a local Ray.")


@dataclass
class GRPOConfig:
    learning_rate: float = uf(1e-4, "AdamW learning rate for the adapter.")
    weight_decay: float = uf(0.0, "AdamW weight decay.")
    adam_beta1: float = uf(0.9, "AdamW beta1.")
    adam_beta2: float = uf(0.999, "AdamW beta2.")
    max_grad_norm: float = uf(1.0, "Gradient clipping norm (0 = off).")
    beta: float = uf(0.0, "KL coefficient (k3 estimator) to the adapter-disabled reference; 0 skips the "
                     "reference pass.")
    epsilon: float = uf(0.2, "Lower clip range of the importance ratio.")
    epsilon_high: float | None = uf(None, "Upper clip range (null = epsilon); DAPO uses 0.28.")
    loss_type: str = uf("grpo", "Loss aggregation: `grpo` (mean per sequence, then over sequences), `bnpo` "
                        "(token mean over the batch), `dr_grpo` (sum / constant max_completion_length).",
                        choices=["grpo", "bnpo", "dr_grpo"])
    scale_rewards: str = uf("group", "Advantage scaling: `group` std, `batch` std, or `none` (Dr. GRPO).",
                            choices=["group", "batch", "none"])
    std_floor: float = uf(1e-4, "Groups whose reward std is below this get zero advantage (no illusory "
                          "advantages from near-identical samples).")
    num_iterations: int = uf(1, "Inner updates per rollout batch (TRL's num_iterations; mu in the GRPO paper).")
    per_device_train_batch_size: int = uf(16, "Samples per forward/backward micro-batch (0 = the largest that "
                                          "fits in free GPU memory).")
    gradient_accumulation_steps: int = uf(1, "Micro-batches accumulated per optimizer step (per inner "
                                         "iteration the batch is split into this many optimizer steps... "
                                         "see README: it groups micro-batches).")
    max_steps: int = uf(100, "Training steps (each = one rollout batch).")
    image_loss_weight: float = uf(1.0, "Weight of the image-token loss when a step mixes image and text tasks.")
    text_loss_weight: float = uf(1.0, "Weight of the text-token loss when a step mixes image and text tasks.")
    max_invalid_fraction: float = uf(0.5, "Abort when the fraction of samples with an invalid reward stays "
                                     "above this for `invalid_patience` steps.")
    invalid_patience: int = uf(3, "Consecutive steps above max_invalid_fraction before aborting.")
    eval_steps: int = uf(0, "Evaluate before the first step and every N steps (0 = never): every task prompt "
                         "sampled eval_samples_per_prompt times with fixed seeds, scored by the reward mixture, "
                         "logged as eval/reward/<name>/mean (a learning curve without the per-step noise).")
    eval_samples_per_prompt: int = uf(4, "Samples per task prompt at each evaluation (grpo.eval_steps).")


@dataclass
class ImageTaskConfig:
    prompts: list[str] = uf(help="Generation prompts (prompt -> image).", factory=list)
    prompts_file: str | None = uf(None, "A text file (one prompt per line) or JSONL with a `prompt` field.")
    prompts_per_step: int = uf(4, "Prompts drawn per step; each is sampled num_generations times.")


@dataclass
class TextTaskConfig:
    synthetic_colors: list[str] = uf(help="Solid-color images to ask about (the synthetic task).", factory=list)
    question: str = uf("What color is this image?", "Question asked about synthetic images.")
    data_file: str | None = uf(None, "JSONL with `image` (path relative to the file), `question`, `answer`.")
    prompts_per_step: int = uf(4, "(image, question) pairs drawn per step, each answered num_generations times.")


@dataclass
class RewardConfig:
    name: str = uf(help="Name used in metrics (reward/<name>/mean).")
    type: str = uf("", "Registered reward type (color, exact_match, clip, self_understanding, ...); "
                   "default = name.")
    weight: float = uf(1.0, "Weight in the mixture.")
    normalize: str = uf("none", "Per-component normalisation before weighting: `none`, `group` (z-score within "
                        "the prompt's group) or `running` (running mean/std over the run).",
                        choices=["none", "group", "running"])
    clip: list[float] | None = uf(None, "Clamp the (normalised) component to [low, high], e.g. [-3, 3].")
    async_scoring: bool | None = uf(None, "Score this component in a background thread while the next chunk of "
                                    "the step samples (see rollout.scoring_chunks). null = the reward's default: "
                                    "yes for `judge` and `ray_actor`, no otherwise. Not allowed for rewards that "
                                    "ask the policy being trained (self_understanding, cycle_consistency).")
    args: dict = uf(help="Keyword arguments for the reward's constructor.", factory=dict)

    def _validate(self, prefix, src):
        if not self.async_scoring:
            return
        from ..rewards.base import reward_types
        cls = reward_types().get(self.type or self.name)
        if cls is not None and getattr(cls, "uses_policy", False):
            raise ConfigError(f"{src.where(f'{prefix}.async_scoring')}: key '{prefix}.async_scoring' cannot be true "
                              f"for reward type {self.type or self.name!r}: it asks the policy being trained, which "
                              f"is sampling at the same time; set it to false or leave it out")


@dataclass
class LoggingConfig:
    log_every: int = uf(1, "Write metrics every N steps.")
    image_grid_every: int = uf(10, "Save a PNG grid of sampled images every N steps (0 = never).")
    save_every: int = uf(25, "Checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = uf(2, "Checkpoints kept on disk.")
    tensorboard: bool = uf(True, "Write TensorBoard events.")
    progress_bar: bool = uf(True, "Show a progress bar.")


@dataclass
class SyntheticPreferenceConfig:
    colors: list[str] = uf(help="Colors of the synthetic set (names from policies.tiny.COLORS).",
                           factory=lambda: ["red", "green", "blue", "yellow"])
    kinds: list[str] = uf(help="Which pairs to make: `generation` (the named color's image preferred over "
                          "another color's) and/or `understanding` (the right color word preferred).",
                          factory=lambda: ["generation", "understanding"])
    pairs_per_combination: int = uf(4, "Pairs per (right color, wrong color) combination and kind; they differ "
                                    "in pixel noise.")
    prompt_template: str = uf("a {color} image", "Generation prompt; `{color}` is replaced by the color name.")
    question: str = uf("What color is this image? Answer in one word.", "Question of the understanding pairs.")
    noise: float = uf(0.05, "Std of the pixel noise added to the synthetic images.")
    palette_tokens: bool = uf(True, "Also store the tiny model's exact palette token ids (`chosen_tokens`) in "
                              "the generation records, used instead of VQ-encoding the PNGs: the tiny VQ "
                              "encoder is crude (it maps many solid colors to a neighbouring code). Ignored "
                              "unless the model is `tiny`.")
    eval_fraction: float = uf(0.25, "Fraction of the (right color, wrong color) combinations held out: their "
                              "pairs go to the eval file only.")


@dataclass
class PreferenceDataConfig:
    train: list[str] = uf(help="Training preference data: JSONL files, `datasets` directories (save_to_disk) "
                          "or hub dataset ids; see README 'Preference data'.", factory=list)
    eval: list[str] = uf(help="Held-out preference data (same forms); empty = hold out `eval_fraction` of "
                         "the training pairs.", factory=list)
    eval_fraction: float = uf(0.1, "Fraction of the training pairs held out for evaluation when `eval` is empty.")
    split: str = uf("train", "Split read from `datasets` sources that hold several.")
    eval_split: str = uf("test", "Split read from `datasets` sources listed under `eval`.")
    skip_invalid: bool = uf(False, "Skip bad records (missing/corrupt image, missing field, wrong type) and "
                            "report how many were skipped, instead of stopping at the first one.")
    cache_dir: str = uf("", "Where VQ token ids of generation-pair images are cached (keyed by file hash and "
                        "VQ model); default <output_dir>/cache.")
    use_record_tokens: bool = uf(True, "Use `chosen_tokens`/`rejected_tokens` stored in records (as `uniloop "
                                 "pairs` writes them) instead of re-encoding the PNGs.")
    synthetic: SyntheticPreferenceConfig | None = uf(None, "Generate a synthetic color preference set into "
                                                     "<output_dir>/synthetic_pairs and train on it (quickstart).")


@dataclass
class DPOConfig:
    beta: float = uf(0.1, "Temperature of the implicit reward beta*(log pi - log ref); for `ipo` the "
                     "regularisation tau. As in TRL.")
    loss_type: list[str] | str = uf(help="DPO loss(es) by name: sigmoid, ipo, hinge, robust, sft; several are "
                                    "summed with `loss_weights` (TRL style, e.g. [sigmoid, sft] = MPO-like).",
                                    factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = uf(None, "One weight per loss_type (null = 1.0 each).")
    label_smoothing: float = uf(0.0, "Probability that a preference label is flipped: `robust` (rDPO) and "
                                "`sigmoid` (cDPO) use it; must be in [0, 0.5).")
    rpo_alpha: float | None = uf(None, "Weight of an extra NLL (SFT) term on the chosen sample (RPO); null = off.")
    precompute_ref_log_probs: bool = uf(False, "Compute the reference (adapter-disabled) log-probs of every "
                                        "training pair once before training and cache them in <output_dir>, "
                                        "instead of a reference forward per step.")
    precompute_ref_batch_size: int | None = uf(None, "Pairs per forward while precomputing (null = "
                                               "per_device_eval_batch_size).")
    logprob_mode: str = uf("conditional", "Offline DPO: image log-probs from the conditional branch "
                           "(`conditional`) or the CFG-guided distribution (`cfg`, uses cfg_scale, doubles the "
                           "forward). online_dpo uses rollout.logprob_mode / rollout.cfg_scale, what it samples "
                           "with.", choices=["conditional", "cfg"])
    cfg_scale: float = uf(5.0, "Offline DPO: guidance scale of the `cfg` log-prob mode.")
    learning_rate: float = uf(1e-5, "AdamW learning rate for the adapter.")
    weight_decay: float = uf(0.0, "AdamW weight decay.")
    adam_beta1: float = uf(0.9, "AdamW beta1.")
    adam_beta2: float = uf(0.999, "AdamW beta2.")
    max_grad_norm: float = uf(1.0, "Gradient clipping norm (0 = off).")
    per_device_train_batch_size: int = uf(8, "Pairs per forward/backward micro-batch.")
    per_device_eval_batch_size: int = uf(16, "Pairs per forward in evaluation.")
    gradient_accumulation_steps: int = uf(1, "Micro-batches per optimizer step.")
    max_steps: int = uf(100, "Optimizer steps (offline DPO) or sample-rank-train rounds (online DPO).")
    eval_steps: int = uf(10, "Evaluate on the held-out pairs (and sample the tasks, if any) every N steps "
                         "(0 = only before and after training).")
    eval_samples_per_prompt: int = uf(2, "Images/answers sampled per task prompt at each evaluation, scored with "
                                      "the reward mixture (fixed seeds, so evaluations are comparable).")
    online_margin: float = uf(0.0, "online_dpo / `uniloop pairs`: keep a prompt's (best, worst) pair only if "
                              "their scores differ by more than this; others are dropped.")
    online_updates: int = uf(1, "online_dpo: optimizer steps on each round of fresh pairs.")
    online_pairs_per_prompt: int = uf(1, "online_dpo / `uniloop pairs`: pairs taken from each prompt's candidates: "
                                      "1 = (best, worst) as in UnifiedReward; k = the i-th best against the i-th "
                                      "worst for i < k (at most num_generations // 2), each kept only if separated "
                                      "by online_margin. More pairs per sampled batch, at more DPO compute.")

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]

    def _validate(self, prefix, src):
        known = ("sigmoid", "ipo", "hinge", "robust", "sft")
        for i, name in enumerate(self.loss_type):
            if name not in known:
                raise ConfigError(f"{src.where(f'{prefix}.loss_type')}: key '{prefix}.loss_type[{i}]' must be one "
                                  f"of {list(known)}, got {name!r}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ConfigError(f"{src.where(f'{prefix}.loss_weights')}: key '{prefix}.loss_weights' has "
                              f"{len(self.loss_weights)} weights for {len(self.loss_type)} loss types")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{src.where(f'{prefix}.label_smoothing')}: key '{prefix}.label_smoothing' must be "
                              f"in [0, 0.5), got {self.label_smoothing}")
        if self.beta <= 0:
            raise ConfigError(f"{src.where(f'{prefix}.beta')}: key '{prefix}.beta' must be > 0, got {self.beta}")


@dataclass
class FlowConfig:
    """The flow-matching generator of `flow_grpo` / `diffusion_dpo` (SD3 family, diffusers)."""

    name_or_path: str = uf("tiny", "Hub id (stabilityai/stable-diffusion-3.5-medium) or local directory of a diffusers "
                           "StableDiffusion3Pipeline; `tiny` builds a tiny one offline (tests, quickstarts).")
    tiny_dir: str = uf("", "Where the tiny pipeline is written when name_or_path is `tiny` "
                       "(default: <output_dir>/../.tiny_models/sd3_seed<seed>, shared between runs).")
    tiny: dict = uf(help="Overrides of the tiny pipeline's shape (latent_size, num_layers, vae_fit_steps, ...; "
                    "see policies.flow.TINY_SD3_DEFAULTS).", factory=dict)
    dtype: str = uf("float32", "Weights dtype of the pipeline; LoRA tensors, log-probs and losses stay float32.",
                    choices=["float32", "bfloat16", "float16"])
    device: str = uf("cpu", "Device of the pipeline (cpu, cuda, cuda:1).")
    load_t5: bool = uf(True, "Load the T5 text encoder; false feeds zeros in its place (saves ~9 GB for SD3.5, "
                       "weaker prompt following).")
    max_sequence_length: int = uf(256, "T5 prompt length in tokens (with load_t5 false: the length of the zero block).")
    lora_target_modules: list[str] = uf(help="Transformer modules that get LoRA adapters (Flow-GRPO's attention "
                                        "projections); r, alpha, dropout and init_adapter come from `lora`.",
                                        factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    gradient_checkpointing: bool = uf(False, "Recompute transformer activations in the backward pass (saves memory).")
    resolution: int = uf(0, "Image side in pixels (0 = the model's default: sample_size x VAE factor).")
    num_steps: int = uf(10, "Denoising steps per sample (Flow-GRPO trains with 10 and evaluates with 40).")
    cfg_scale: float = uf(4.5, "Classifier-free guidance scale for sampling and for the recomputed log-probs "
                          "(<= 1 disables CFG and halves the cost).")
    noise_level: float = uf(0.7, "The SDE noise level a in sigma_t = a*sqrt(t/(1-t)) (Flow-GRPO: 0.7); > 0.")
    sample_batch_size: int = uf(0, "Samples per forward batch while sampling (0 = all at once).")
    train_timestep_fraction: float = uf(1.0, "Fraction of the num_steps transitions trained per step, drawn at "
                                        "random each step (< 1 trades signal for speed).")
    train_timesteps: list[int] = uf(help="Explicit transition indices to train (0 = the first, noisiest step); "
                                    "overrides train_timestep_fraction when non-empty.", factory=list)
    adv_clip_max: float = uf(5.0, "Flow-GRPO clips advantages to [-adv_clip_max, adv_clip_max].")
    dpo_timestep_sampling: str = uf("uniform", "Diffusion-DPO: how each pair's flow time t is drawn: `uniform`, "
                                    "or `logit_normal` (SD3's training distribution).",
                                    choices=["uniform", "logit_normal"])

    def _validate(self, prefix, src):
        if self.noise_level <= 0:
            raise ConfigError(f"{src.where(f'{prefix}.noise_level')}: key '{prefix}.noise_level' must be > 0 "
                              f"(a deterministic step has no log-prob), got {self.noise_level}")
        if self.num_steps < 1:
            raise ConfigError(f"{src.where(f'{prefix}.num_steps')}: key '{prefix}.num_steps' must be >= 1")
        if not 0 < self.train_timestep_fraction <= 1:
            raise ConfigError(f"{src.where(f'{prefix}.train_timestep_fraction')}: key "
                              f"'{prefix}.train_timestep_fraction' must be in (0, 1], got {self.train_timestep_fraction}")
        bad = [k for k in self.train_timesteps if not 0 <= k < self.num_steps]
        if bad:
            raise ConfigError(f"{src.where(f'{prefix}.train_timesteps')}: key '{prefix}.train_timesteps' has "
                              f"indices {bad} outside [0, num_steps={self.num_steps})")


@dataclass
class RolloutJobConfig:
    """`uniloop rollout`: sample and score a prompt file into resumable shards and a gallery."""

    prompts: str = uf(help="Prompt source: a JSONL file (per line `prompt` -> images, or `image` + `question` "
                      "-> answers; optional `target`), a text file (one image prompt per line), or a "
                      "`datasets` directory (save_to_disk) with the same columns.")
    split: str = uf("train", "Split read from a `datasets` directory that holds several.")
    prompt_field: str = uf("prompt", "Record field holding an image-generation prompt.")
    question_field: str = uf("question", "Record field holding a question about `image_field` (answer sampling).")
    image_field: str = uf("image", "Record field holding the image asked about: a path relative to the prompt "
                          "file (or absolute), or an image column of a `datasets` directory.")
    target_field: str = uf("target", "Optional record field with a reference (a color, an answer) for rewards.")
    samples_per_prompt: int = uf(4, "Samples drawn per prompt (images or answers).")
    adapter: str | None = uf(None, "Sample from this LoRA adapter: a PEFT adapter directory, a checkpoint "
                             "(<run>/checkpoints/step_N) or a run directory (its latest checkpoint); null = the "
                             "base model.")
    prompts_per_shard: int = uf(16, "Prompts per output shard. A shard (JSONL + PNGs) is written atomically, so "
                                "an interrupted job loses at most the shards in flight.")
    limit: int | None = uf(None, "Only the first N prompts of the source (null = all).")
    gallery_size: int = uf(8, "Best and worst samples (each, per kind) shown in gallery.html.")

    def _validate(self, prefix, src):
        for key in ("samples_per_prompt", "prompts_per_shard", "gallery_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{src.where(f'{prefix}.{key}')}: key '{prefix}.{key}' must be >= 1, "
                                  f"got {getattr(self, key)}")


@dataclass
class Config:
    seed: int = uf(0, "Random seed; every sample's randomness derives from (seed, step, prompt, sample).")
    output_dir: str = uf("runs/quickstart", "Run directory (config, metrics, grids, checkpoints).")
    algorithm: str = uf("grpo", "Training algorithm.",
                        choices=["grpo", "dpo", "online_dpo", "flow_grpo", "diffusion_dpo"])
    model: ModelConfig = uf(help="The policy model.", factory=ModelConfig)
    lora: LoraSection = uf(help="The LoRA adapter (PEFT).", factory=LoraSection)
    rollout: RolloutConfig = uf(help="Sampling.", factory=RolloutConfig)
    ray: RayConfig = uf(help="Ray runtime (used when rollout.num_workers > 0).", factory=RayConfig)
    grpo: GRPOConfig = uf(help="GRPO optimisation (option names follow TRL's GRPOConfig).", factory=GRPOConfig)
    image_task: ImageTaskConfig | None = uf(None, "prompt -> image task (null = none).")
    text_task: TextTaskConfig | None = uf(None, "(image, question) -> answer task (null = none).")
    rewards: list[RewardConfig] = uf(help="The reward mixture.", factory=list)
    reward_combine: str = uf("sum_then_normalize", "`sum_then_normalize`: weighted sum of the components, "
                             "the advantage normalises the total; `normalize_then_sum`: each component is "
                             "z-scored within its group first (unless it sets `normalize`), then weighted.",
                             choices=["sum_then_normalize", "normalize_then_sum"])
    logging: LoggingConfig = uf(help="Logging and checkpointing.", factory=LoggingConfig)
    dpo: DPOConfig | None = uf(None, "DPO / online DPO options (names follow TRL's DPOConfig).")
    preference_data: PreferenceDataConfig | None = uf(None, "Preference pairs for offline DPO (algorithm: dpo).")
    flow: FlowConfig | None = uf(None, "The flow-matching generator (algorithm: flow_grpo or diffusion_dpo).")
    job: RolloutJobConfig | None = uf(None, "`uniloop rollout` job: prompt file -> scored samples in shards, "
                                      "summary and gallery (uses model, lora, rollout, ray, rewards, seed, "
                                      "output_dir).")


# ----------------------------------------------------------------------------- loading
class ConfigError(ValueError):
    """A config problem; the message names the file, line and key."""


class _Src:
    """Where a value came from: file + line, or a --set override."""

    def __init__(self, file: str, lines: dict[str, int], overridden: set[str]):
        self.file, self.lines, self.overridden = file, lines, overridden

    def where(self, key: str) -> str:
        if key in self.overridden:
            return f"--set {key}"
        k = key
        while k:
            if k in self.lines:
                return f"{self.file}:{self.lines[k]}"
            k = k.rpartition(".")[0]
        return self.file


def _compose_with_lines(text: str, file: str) -> tuple[Any, dict[str, int]]:
    """yaml.safe_load plus a map dotted-key -> line number (1-based)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"{file}:{mark.line + 1}" if mark else file
        raise ConfigError(f"{loc}: not valid YAML: {getattr(e, 'problem', e)}") from None
    lines: dict[str, int] = {}

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                key = f"{prefix}[{i}]"
                lines[key] = v.start_mark.line + 1
                walk(v, key)

    if node is not None:
        walk(node, "")
    return data, lines


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _help_type(tp) -> str:
    """`float | None` -> `float or null` (no `|`, which separates the columns of the help table)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _help_type(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "") if typing.get_args(tp) else _type_name(tp)


def _convert(value, tp, key: str, src: _Src):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _convert(value, a, key, src)
            except ConfigError as e:
                errors.append(e)
        raise errors[-1]
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{src.where(key)}: key '{key}' must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key, src)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{src.where(key)}: key '{key}' must be a list, got {type(value).__name__} {value!r}")
        return [_convert(v, args[0] if args else Any, f"{key}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{src.where(key)}: key '{key}' must be a mapping, got {type(value).__name__}")
        return dict(value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{src.where(key)}: key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):  # YAML reads 1e-4 as a string; accept what float() accepts
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{src.where(key)}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{src.where(key)}: key '{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{src.where(key)}: key '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{src.where(key)}: key '{key}' must be a string, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str, src: _Src):
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in known:
            close = difflib.get_close_matches(str(k), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"{src.where(key)}: unknown key '{key}'{hint}")
        value = _convert(v, hints[k], key, src)
        choices = known[k].metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{src.where(key)}: key '{key}' must be one of {list(choices)}, got {value!r}")
        kwargs[k] = value
    missing = [f.name for f in known.values()
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{src.where(prefix) if prefix else src.file}: missing required key "
                          f"'{(prefix + '.') if prefix else ''}{missing[0]}'")
    obj = cls(**kwargs)
    check = getattr(obj, "_validate", None)
    if check:
        check(prefix, src)
    return obj


def _set_dotted(data: dict, dotted: str, value):
    parts = dotted.split(".")
    cur = data
    for i, p in enumerate(parts[:-1]):
        if "[" in p:  # rewards[0].weight
            name, idx = p[:-1].split("[")
            cur = cur.setdefault(name, [])[int(idx)]
            continue
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{'.'.join(parts[:i + 1])}' is not a mapping")
        cur = nxt
    last = parts[-1]
    if "[" in last:
        name, idx = last[:-1].split("[")
        cur[name][int(idx)] = value
    else:
        cur[last] = value


def parse_overrides(items: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value (e.g. --set grpo.learning_rate=1e-4)")
        k, v = item.split("=", 1)
        try:
            out.append((k.strip(), yaml.safe_load(v) if v.strip() else None))
        except yaml.YAMLError:
            out.append((k.strip(), v))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, text: str | None = None,
                cls=Config):
    """Load a YAML recipe (or `text`) into `cls`, applying `--set` overrides; errors name file/line/key."""
    file = str(path) if path is not None else "<config>"
    if text is None:
        if path is None:
            text = ""
        else:
            p = Path(path)
            if not p.exists():
                raise ConfigError(f"{file}: config file not found")
            text = p.read_text()
    data, lines = _compose_with_lines(text, file)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}:1: the top level must be a mapping of keys, got {type(data).__name__}")
    over = parse_overrides(overrides)
    for k, v in over:
        _set_dotted(data, k, v)
    return _build(cls, data, "", _Src(file, lines, {k for k, _ in over}))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path):
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_help(cls=Config, prefix: str = "") -> list[str]:
    """One line per field: dotted key, type, default, help (for the README and `uniloop config-help`)."""
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = typing.get_type_hints(cls)[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        sub = tp if dataclasses.is_dataclass(tp) else (inner[0] if inner else None)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING and sub is None:
            default = f.default_factory()
        else:
            default = "" if sub else "(required)"
        out.append(f"{key} | {_help_type(tp)} | {default!r} | {f.metadata.get('help', '')}"
                   if sub is None else f"{key} | section | | {f.metadata.get('help', '')}")
        if sub is not None:
            out.extend(config_help(sub, key + ("[].") if typing.get_origin(tp) is list else key + "."))
    return out


def config_reference_markdown() -> str:
    """The README's config reference table (`uniloop config-help --markdown`; a test keeps them equal)."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for line in config_help():
        key, tp, rest = line.split(" | ", 2)
        if tp == "section":  # "key | section | | help"
            help_ = rest.removeprefix("| ").replace("|", "\\|")
            rows.append(f"| **`{key}`** | section | | {help_} |")
            continue
        default, help_ = rest.split(" | ", 1)
        help_ = help_.replace("|", "\\|")
        default = {"None": "null", "True": "true", "False": "false"}.get(default, default).replace("|", "\\|")
        rows.append(f"| `{key}` | {tp} | `{default}` | {help_} |")
    return "\n".join(rows)
