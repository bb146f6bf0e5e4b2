"""The run configuration: every section of a recipe as a dataclass with a help text per field.

`uniloop config-help` prints them all; the README's reference table is generated from them. Loading
(YAML with file:line in every error, `--set a.b=value` overrides checked like the file) is
`rl/config_loader.py`; checks that need the registries of algorithms, rewards and policies run
after loading, before any model loads (`rl/validate.py`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from . import config_loader
from .config_loader import ConfigError, uf
from .config_recipes import ReasoningConfig, UniRLConfig
from ..rewards.base import reward_types
from .losses import ADVANTAGE_ESTIMATORS, DPO_LOSSES, IS_CORRECTIONS, LOSS_AGGREGATIONS, POLICY_LOSSES
from .flow_config import FlowConfig  # noqa: F401  (a section of RunConfig; re-exported)
from .learner_config import LearnerConfig, RayConfig  # noqa: F401  (sections of RunConfig; re-exported)


# ----------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """The unified policy model (`model:`): which checkpoint, which family, how it is loaded."""

    name_or_path: str = uf("tiny", "Hub id (deepseek-community/Janus-Pro-1B) or local directory of a unified "
                           "model checkpoint; `tiny` builds a tiny random model of the family offline (tests, "
                           "quickstart) with the run's seed; `tiny-emu3` the tiny model of that family.")
    family: str = uf("auto", "Policy family (a registered policy class: janus, emu3, ...); `auto` = from the "
                     "checkpoint's config.json `model_type` (janus for `tiny` and for hub ids).")
    load_args: dict = uf(help="Extra keyword arguments of the family's from_pretrained (emu3: image_area, "
                         "negative_prompt).", factory=dict)
    tiny_dir: str = uf("", "Where the tiny model is written when name_or_path is `tiny` "
                       "(default: <output_dir>/../.tiny_models/<family>_seed<seed>, shared between runs).")
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
    """The LoRA adapter (PEFT) that is trained; the base stays frozen and is the reference model."""

    r: int = uf(16, "LoRA rank.", ge=1)
    alpha: int = uf(32, "LoRA alpha (scale = alpha / r).", gt=0)
    dropout: float = uf(0.0, "LoRA dropout.", ge=0, lt=1)
    init_adapter: str | None = uf(None, "Start from a saved PEFT adapter directory instead of a fresh one.")
    target_modules: str | None = uf(None, "Regex (or comma-separated names) of the modules that get adapters; "
                                    "null = the family's default: the attention projections of the language "
                                    "model only (away from SigLIP and the VQ model).")


@dataclass
class RolloutConfig:
    """How rollouts are sampled (`rollout:`), in-process or on Ray actors, and how many per prompt."""

    num_generations: int = uf(8, "Samples per prompt (the GRPO group size), as in TRL.", ge=1)
    cfg_scale: float = uf(5.0, "Classifier-free guidance scale for image sampling (<= 1 disables CFG).", ge=0)
    temperature: float = uf(1.0, "Sampling temperature (0 = greedy).", ge=0)
    top_k: int = uf(0, "Top-k filter for image tokens (0 = off).", ge=0)
    sampler: str = uf("auto", "Image sampler: `auto` (the fast static-cache/CUDA-graph sampler on CUDA, the "
                      "plain loop on CPU), `plain` or `fast`. Same computation: bit-identical on CPU and in "
                      "float32; bf16 GPU samples drift apart after ~100 tokens (kernel rounding; BENCHMARKS.md).",
                      choices=["auto", "plain", "fast"])
    max_new_tokens: int = uf(16, "Maximum answer length for text (understanding) rollouts.", ge=1)
    logprob_mode: str = uf("cfg", "Which image distribution the ratio is computed on: `cfg` (the guided one "
                           "sampled from) or `conditional` (conditional branch only, T2I-R1 style).",
                           choices=["cfg", "conditional"])
    batch_size: int = uf(64, "Samples generated per forward batch inside a worker.", ge=0)
    num_workers: int = uf(0, "Ray rollout actors (0 = sample in-process, no Ray).")
    one_step_off: bool = uf(False, "Sample step k+1 while step k trains (needs num_workers > 0 and "
                             "max_staleness >= 1); the importance ratio uses the sampler's recorded log-probs.")
    num_gpus_per_worker: float = uf(0.0, "GPUs per rollout actor (fractions allowed).", ge=0)
    num_cpus_per_worker: float = uf(1.0, "CPUs per rollout actor.", ge=0)
    max_staleness: int = uf(0, "Largest allowed gap between the learner's adapter version and a rollout's "
                            "(0 = strictly on-policy).")
    max_restarts: int = uf(3, "Restarts allowed per rollout actor before the run gives up.")
    weight_bucket_mb: float = uf(512.0, "learner.full_finetune: the trained weights travel from the learner ranks "
                                 "to the driver and from the driver to the rollout actors in buckets of at most "
                                 "this many MiB (at most two in flight), never as a second full copy.", gt=0)
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
class OptimizerConfig:
    """AdamW and gradient clipping: the fields every learner section shares (TRL's TrainingArguments)."""

    learning_rate: float = uf(1e-4, "AdamW learning rate for the adapter.", gt=0)
    weight_decay: float = uf(0.0, "AdamW weight decay.", ge=0)
    adam_beta1: float = uf(0.9, "AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = uf(0.999, "AdamW beta2.", ge=0, lt=1)
    max_grad_norm: float = uf(1.0, "Gradient clipping norm (0 = off).", ge=0)


@dataclass
class GRPOConfig(OptimizerConfig):
    """GRPO (and Flow-GRPO): advantages, the clipped loss, its aggregation, the schedule. Option
    names follow TRL's GRPOConfig."""

    beta: float = uf(0.0, "KL coefficient (k3 estimator) to the adapter-disabled reference; 0 skips the "
                     "reference pass.", ge=0)
    epsilon: float = uf(0.2, "Lower clip range of the importance ratio.", gt=0)
    epsilon_high: float | None = uf(None, "Upper clip range (null = epsilon); DAPO uses 0.28.", gt=0)
    max_invalid_fraction: float = uf(0.5, "Abort when the fraction of samples with an invalid reward stays "
                                     "above this for `invalid_patience` steps.", ge=0, le=1)
    invalid_patience: int = uf(3, "Consecutive steps above max_invalid_fraction before aborting.", ge=1)
    flat_group_warning: float = uf(0.9, "Warn when at least this fraction of prompt groups has identical rewards "
                                   "(no learning signal) ...", ge=0, le=1)
    flat_group_patience: int = uf(10, "... for this many consecutive steps (0 = never warn).", ge=0)
    eval_samples_per_prompt: int = uf(4, "Samples per task prompt at each evaluation (grpo.eval_steps).", ge=0)
    eval_steps: int = uf(0, "Evaluate before the first step and every N steps (0 = never): every task prompt "
                         "sampled eval_samples_per_prompt times with fixed seeds, scored by the reward mixture, "
                         "logged as eval/reward/<name>/mean (a learning curve without the per-step noise).", ge=0)
    importance_sampling_level: str = uf("token", "Policy loss (registry `rl.losses.register_policy_loss`): `token` "
                                        "(one ratio per token: GRPO/PPO) or `sequence` (one ratio per sequence "
                                        "from its mean token log-ratio: GSPO), as TRL's option of this name.",
                                        choices=lambda: sorted(POLICY_LOSSES))
    text_loss_weight: float = uf(1.0, "Weight of the text-token loss (answers, and the plan segment of `reasoning` "
                                 "rollouts); each segment is aggregated on its own (loss_type), then weighted.", ge=0)
    loss_type: str = uf("grpo", "Loss aggregation (registry `rl.losses.register_loss_aggregation`): `grpo` (mean per "
                        "sequence, then over sequences), `bnpo` (token mean over the optimizer step), `dr_grpo` "
                        "(sum / constant max_completion_length), `dapo` (TRL's: token sum / the rollout batch's "
                        "tokens per optimizer step).", choices=lambda: sorted(LOSS_AGGREGATIONS))
    image_loss_weight: float = uf(1.0, "Weight of the image-token loss (image rollouts and the image segment of "
                                  "`reasoning` rollouts).", ge=0)
    num_iterations: int = uf(1, "Inner updates per rollout batch (TRL's num_iterations; mu in the GRPO paper).", ge=1)
    max_steps: int = uf(100, "Training steps (each = one rollout batch).", ge=1)
    per_device_train_batch_size: int = uf(16, "Samples per forward/backward micro-batch (0 = the largest that "
                                          "fits in free GPU memory).", ge=0)
    gradient_accumulation_steps: int = uf(1, "Micro-batches accumulated per optimizer step: each inner iteration "
                                         "takes one optimizer step per this many micro-batches.", ge=1)
    std_floor: float = uf(1e-4, "Groups whose reward std is below this get zero advantage (no illusory "
                          "advantages from near-identical samples).", ge=0)
    scale_rewards: str = uf("group", "Advantage scaling: `group` std, `batch` std, or `none` (Dr. GRPO).",
                            choices=["group", "batch", "none"])
    std_ddof: int = uf(1, "Delta degrees of freedom of the reward std: 1 = sample std (torch.std, TRL), 0 = "
                       "population std (np.std: flow_grpo's per-prompt stat tracker).", choices=[0, 1])
    advantage_estimator: str = uf("grpo", "Advantage estimator (registry `rl.losses.register_advantage_estimator`): "
                                  "`grpo` (group-relative, scaled by scale_rewards) or `rloo` (leave-one-out "
                                  "baseline, as TRL's RLOO).", choices=lambda: sorted(ADVANTAGE_ESTIMATORS))
    vllm_importance_sampling_correction: bool = uf(True, "Reweight the loss by the learner/sampler probability "
                                                   "ratio of each sampled token (truncated importance sampling, TRL's "
                                                   "option of this name): corrects the sampler's kernels (bf16 "
                                                   "rounding) and, for rollout.one_step_off batches, its one-version "
                                                   "lag; the clipped ratio is then taken against the learner's own "
                                                   "log-probs (exactly 1 on the first pass). false: the ratio's "
                                                   "denominator is the sampler's log-probs for one-step-off batches.")
    vllm_importance_sampling_mode: str = uf("token_truncate", "How the weights are formed (registry "
                                            "`rl.losses.register_is_correction`): per token or per sequence (the "
                                            "product over its tokens), truncated to [clip_min, clip_max] or zeroed "
                                            "outside it. TRL defaults to sequence_mask; a 576-token image "
                                            "multiplies 576 token ratios, so uniloop defaults to token_truncate.",
                                            choices=lambda: sorted(IS_CORRECTIONS))
    vllm_importance_sampling_clip_max: float | None = uf(3.0, "Upper bound C_max of the weights (TRL's; "
                                                         "formerly vllm_importance_sampling_cap).", gt=0)
    vllm_importance_sampling_clip_min: float | None = uf(None, "Lower bound C_min of the weights (null = none).",
                                                         ge=0)

    def _validate(self, prefix, src):
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if lo is not None and hi is not None and lo > hi:
            key = f"{prefix}.vllm_importance_sampling_clip_min"
            raise ConfigError(f"{src.where(key)}: key '{key}' ({lo}) must not exceed "
                              f"{prefix}.vllm_importance_sampling_clip_max ({hi})")


@dataclass
class ImageTaskConfig:
    """prompt -> image: where the generation prompts come from."""

    prompts: list[str] = uf(help="Generation prompts (prompt -> image).", factory=list)
    prompts_file: str | None = uf(None, "A text file (one prompt per line) or JSONL with a `prompt` field (and an "
                                  "optional `target`, e.g. the color a prompt names only indirectly).")
    targets: list[str] = uf(help="Per-prompt ground truth for rewards (a color name), one per entry of `prompts`; "
                            "empty = the color word of the prompt, if any.", factory=list)
    prompts_per_step: int = uf(4, "Prompts drawn per step; each is sampled num_generations times.", ge=1)
    order: str = uf("shuffle", "How a step draws its prompts: `shuffle` (the next prompts_per_step of seeded "
                    "shuffled passes over all prompts: no repeats within a pass) or `cycle` (the next prompts_per_step "
                    "in list order). With prompts_per_step = the number of prompts, both give every prompt every step.",
                    choices=["shuffle", "cycle"])

    def _validate(self, prefix, src):
        if self.targets and len(self.targets) != len(self.prompts):
            raise ConfigError(f"{src.where(f'{prefix}.targets')}: key '{prefix}.targets' has {len(self.targets)} "
                              f"entries for {len(self.prompts)} prompts")


@dataclass
class TextTaskConfig:
    """(image, question) -> answer: the understanding task."""

    synthetic_colors: list[str] = uf(help="Solid-color images to ask about (the synthetic task).", factory=list)
    question: str = uf("What color is this image?", "Question asked about synthetic images.")
    data_file: str | None = uf(None, "JSONL with `image` (path relative to the file), `question`, `answer`.")
    prompts_per_step: int = uf(4, "(image, question) pairs drawn per step, each answered num_generations times.", ge=1)


@dataclass
class RewardConfig:
    """One component of the reward mixture."""

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
        cls = reward_types().get(self.type or self.name)
        if cls is not None and getattr(cls, "uses_policy", False):
            raise ConfigError(f"{src.where(f'{prefix}.async_scoring')}: key '{prefix}.async_scoring' cannot be true "
                              f"for reward type {self.type or self.name!r}: it asks the policy being trained, which "
                              f"is sampling at the same time; set it to false or leave it out")


@dataclass
class LoggingConfig:
    """Metrics, sample grids, checkpoints, progress."""

    progress_bar: bool = uf(True, "Show progress: a bar on a terminal, a line every ~5% of the steps in a log file.")
    tensorboard: bool = uf(True, "Write TensorBoard events (false drops `tensorboard` from report_to; kept for "
                           "older recipes).")
    report_to: list[str] | str = uf(help="Trackers that get the metrics and sample grids, as TRL's `report_to`: "
                                    "any of tensorboard, wandb, trackio, mlflow (or `all`, `none`); each is imported "
                                    "only when named (`pip install uniloop[tracking]`). Offline by default: "
                                    "WANDB_MODE=offline, trackio's local SQLite, MLflow's sqlite:///<output_dir>/"
                                    "mlflow.db (README 'Trackers'). metrics.jsonl is always written.",
                                    factory=lambda: ["tensorboard"])
    project: str = uf("uniloop", "Project / experiment name in the trackers (WANDB_PROJECT and "
                      "MLFLOW_EXPERIMENT_NAME override it, as in TRL).")
    run_name: str = uf("", "Run name in the trackers (empty = the output_dir's name).")
    log_every: int = uf(1, "Write metrics every N steps.", ge=1)
    image_grid_every: int = uf(10, "Save a PNG grid of sampled images every N steps (0 = never).", ge=0)
    save_every: int = uf(25, "Checkpoint every N steps (0 = only at the end).", ge=0)
    keep_checkpoints: int = uf(2, "Checkpoints kept on disk.", ge=1)


@dataclass
class SyntheticPreferenceConfig:
    """The synthetic color preference set of the DPO quickstarts."""

    colors: list[str] = uf(help="Colors of the synthetic set (names from policies.tiny.COLORS).",
                           factory=lambda: ["red", "green", "blue", "yellow"])
    kinds: list[str] = uf(help="Which pairs to make: `generation` (the named color's image preferred over "
                          "another color's) and/or `understanding` (the right color word preferred).",
                          factory=lambda: ["generation", "understanding"])
    pairs_per_combination: int = uf(4, "Pairs per (right color, wrong color) combination and kind; they differ "
                                    "in pixel noise.", ge=1)
    prompt_template: str = uf("a {color} image", "Generation prompt; `{color}` is replaced by the color name.")
    question: str = uf("What color is this image? Answer in one word.", "Question of the understanding pairs.")
    noise: float = uf(0.05, "Std of the pixel noise added to the synthetic images.", ge=0)
    palette_tokens: bool = uf(True, "Also store the tiny model's exact palette token ids (`chosen_tokens`) in "
                              "the generation records, used instead of VQ-encoding the PNGs: the tiny VQ "
                              "encoder is crude (it maps many solid colors to a neighbouring code). Ignored "
                              "unless the model is `tiny`.")
    eval_fraction: float = uf(0.25, "Fraction of the (right color, wrong color) combinations held out: their "
                              "pairs go to the eval file only.", ge=0, lt=1)


@dataclass
class PreferenceDataConfig:
    """Preference pairs for offline DPO: files, datasets, hub ids, or the synthetic set."""

    train: list[str] = uf(help="Training preference data: JSONL files, `datasets` directories (save_to_disk) "
                          "or hub dataset ids; see README 'Preference data'.", factory=list)
    eval: list[str] = uf(help="Held-out preference data (same forms); empty = hold out `eval_fraction` of "
                         "the training pairs.", factory=list)
    eval_fraction: float = uf(0.1, "Fraction of the training pairs held out for evaluation when `eval` is empty.",
                              ge=0, lt=1)
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
class DPOConfig(OptimizerConfig):
    """DPO and online DPO (option names follow TRL's DPOConfig)."""

    learning_rate: float = uf(1e-5, "AdamW learning rate for the adapter (DPO wants less than GRPO).", gt=0)
    beta: float = uf(0.1, "Temperature of the implicit reward beta*(log pi - log ref); for `ipo` the "
                     "regularisation tau. As in TRL.")
    loss_type: list[str] | str = uf(help="DPO loss(es) by name (registry `rl.losses.register_dpo_loss`): sigmoid, "
                                    "ipo, hinge, robust, sft; several are summed with `loss_weights` (TRL style, "
                                    "e.g. [sigmoid, sft] = MPO-like).",
                                    factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = uf(None, "One weight per loss_type (null = 1.0 each).")
    label_smoothing: float = uf(0.0, "Probability that a preference label is flipped: `robust` (rDPO) and "
                                "`sigmoid` (cDPO) use it; must be in [0, 0.5).")
    rpo_alpha: float | None = uf(None, "Weight of an extra NLL (SFT) term on the chosen sample (RPO); null = off.")
    per_device_eval_batch_size: int = uf(16, "Pairs per forward in evaluation.", ge=1)
    per_device_train_batch_size: int = uf(8, "Pairs per forward/backward micro-batch.", ge=1)
    gradient_accumulation_steps: int = uf(1, "Micro-batches per optimizer step.", ge=1)
    max_steps: int = uf(100, "Optimizer steps (offline DPO) or sample-rank-train rounds (online DPO).", ge=1)
    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
    online_pairs_per_prompt: int = uf(1, "online_dpo / `uniloop pairs`: pairs taken from each prompt's candidates: "
                                      "1 = (best, worst) as in UnifiedReward; k = the i-th best against the i-th "
                                      "worst for i < k (at most num_generations // 2), each kept only if separated "
                                      "by online_margin. More pairs per sampled batch, at more DPO compute.", ge=1)

    online_margin: float = uf(0.0, "online_dpo / `uniloop pairs`: keep a prompt's (best, worst) pair only if "
                              "their scores differ by more than this; others are dropped.", ge=0)
    online_updates: int = uf(1, "online_dpo: optimizer steps on each round of fresh pairs.", ge=1)
    precompute_ref_log_probs: bool = uf(False, "Compute the reference (adapter-disabled) log-probs of every "
                                        "training pair once before training and cache them in <output_dir>, "
                                        "instead of a reference forward per step.")
    precompute_ref_batch_size: int | None = uf(None, "Pairs per forward while precomputing (null = "
                                               "per_device_eval_batch_size).", ge=1)
    logprob_mode: str = uf("conditional", "Offline DPO: image log-probs from the conditional branch "
                           "(`conditional`) or the CFG-guided distribution (`cfg`, uses cfg_scale, doubles the "
                           "forward). online_dpo uses rollout.logprob_mode / rollout.cfg_scale, what it samples "
                           "with.", choices=["conditional", "cfg"])
    cfg_scale: float = uf(5.0, "Offline DPO: guidance scale of the `cfg` log-prob mode.", ge=0)
    eval_steps: int = uf(10, "Evaluate on the held-out pairs (and sample the tasks, if any) every N steps "
                         "(0 = only before and after training).", ge=0)
    eval_samples_per_prompt: int = uf(2, "Samples per task prompt at each evaluation (fixed seeds), scored by the "
                                      "rewards.", ge=0)

    def _validate(self, prefix, src):
        known = sorted(DPO_LOSSES)
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
class EvalConfig:
    """`uniloop eval`: a checkpoint on a prompt set, fixed seeds and settings, every configured reward."""

    prompts: str = uf("", "Prompt set: a text file (one image prompt per line), a JSONL file (`prompt` and optional "
                      "`target`, or `image` + `question` for answers; GenEval metadata for the detector reward) or a "
                      "`datasets` directory: the formats of `job.prompts`.")
    checkpoint: str | None = uf(None, "The adapter evaluated: a PEFT adapter directory, a checkpoint or a run "
                                "directory (its latest checkpoint); null = the base model (`--checkpoint`).")
    samples_per_prompt: int = uf(4, "Samples per prompt (GenEval: 4), seeded from (seed, prompt, sample) the same "
                                 "way at every evaluation, so two checkpoints see the same noise.", ge=1)
    num_steps: int = uf(0, "Flow generators: denoising steps (0 = flow.num_steps; Flow-GRPO evaluates with 40).", ge=0)
    cfg_scale: float | None = uf(None, "Guidance scale (null = the recipe's rollout.cfg_scale / flow.cfg_scale).",
                                 ge=0)
    limit: int | None = uf(None, "Only the first N prompts (null = all).", ge=1)
    output_dir: str = uf("", "Where the table, gallery and summary go (default <output_dir>/eval).")


@dataclass
class Config:
    """A whole run: every section of a recipe."""

    seed: int = uf(0, "Random seed; every sample's randomness derives from (seed, step, prompt, sample).")
    output_dir: str = uf("runs/quickstart", "Run directory (config, metrics, grids, checkpoints).")
    algorithm: str = uf("grpo", "Training algorithm: a registered one (grpo, dpo, online_dpo, flow_grpo, "
                        "diffusion_dpo, diffusion_nft, or your own: `rl.registry.register_algorithm`).")
    model: ModelConfig = uf(help="The policy model.", factory=ModelConfig)
    lora: LoraSection = uf(help="The LoRA adapter (PEFT).", factory=LoraSection)
    rollout: RolloutConfig = uf(help="Sampling.", factory=RolloutConfig)
    ray: RayConfig = uf(help="Ray runtime (used when rollout.num_workers > 0 or learner.num_workers > 1).",
                        factory=RayConfig)
    learner: LearnerConfig = uf(help="The learner: in-process, or data-parallel / sharded ranks on Ray.",
                                factory=LearnerConfig)
    grpo: GRPOConfig = uf(help="GRPO optimisation (option names follow TRL's GRPOConfig).", factory=GRPOConfig)
    image_task: ImageTaskConfig | None = uf(None, "prompt -> image task (null = none).")
    text_task: TextTaskConfig | None = uf(None, "(image, question) -> answer task (null = none).")
    reasoning: ReasoningConfig | None = uf(None, "Plan-then-image rollouts for image_task (T2I-R1; null = plain "
                                           "image rollouts). Janus family.")
    unirl: UniRLConfig | None = uf(None, "UniRL's loop for grpo: the step's generated images become understanding "
                                   "questions trained in the same step (null = off). Needs image_task.")
    rewards: list[RewardConfig] = uf(help="The reward mixture.", factory=list)
    reward_combine: str = uf("sum_then_normalize", "`sum_then_normalize`: weighted sum of the components, "
                             "the advantage normalises the total; `normalize_then_sum`: each component is "
                             "z-scored within its group first (unless it sets `normalize`), then weighted.",
                             choices=["sum_then_normalize", "normalize_then_sum"])
    logging: LoggingConfig = uf(help="Logging and checkpointing.", factory=LoggingConfig)
    dpo: DPOConfig | None = uf(None, "DPO / online DPO options (names follow TRL's DPOConfig).")
    preference_data: PreferenceDataConfig | None = uf(None, "Preference pairs for offline DPO (algorithm: dpo).")
    flow: FlowConfig | None = uf(None, "The flow-matching generator (algorithm: flow_grpo, diffusion_dpo or "
                                  "diffusion_nft).")
    eval: EvalConfig = uf(help="`uniloop eval`: a checkpoint on a prompt set.", factory=EvalConfig)
    job: RolloutJobConfig | None = uf(None, "`uniloop rollout` job: prompt file -> scored samples in shards, "
                                      "summary and gallery (uses model, lora, rollout, ray, rewards, seed, "
                                      "output_dir).")


# ----------------------------------------------------------------------------- loading and help
def load_config(path: str | Path | None = None, overrides: list[str] | None = None, text: str | None = None,
                cls=Config):
    """Load a YAML recipe (or `text`) into `cls`, applying `--set` overrides; errors name file/line/key."""
    return config_loader.load_config(path, overrides, text, cls=cls)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path):
    config_loader.save_yaml(to_dict(cfg), path)


def config_help(cls=Config, prefix: str = "") -> list[str]:
    """One line per field: dotted key, type, default, help (for the README and `uniloop config-help`)."""
    return config_loader.config_help(cls, prefix)


def config_reference_markdown() -> str:
    """The README's config reference table (`uniloop config-help --markdown`; a test keeps them equal)."""
    return config_loader.config_reference_markdown(Config)
