"""The denoising steps of a flow-matching sampler, each with the log-prob of its transition (fp32).

t is the flow "sigma": x_t = (1 - t) * x_0 + t * noise, velocity v = noise - x_0; dt = t_next - t < 0.

- `sde`  (Flow-GRPO): sigma_t = a*sqrt(t/(1-t)), mean = x*(1 + sigma_t^2*dt/(2t)) + v*(1 + sigma_t^2*(1-t)/(2t))*dt,
          x_next = mean + sigma_t*sqrt(-dt)*noise; log-prob = the Gaussian density, mean over dimensions.
- `cps`  (coefficients-preserving sampling, flow_grpo's `sde_type="cps"`): std = t_next*sin(a*pi/2),
          mean = (1 - t_next)*x0_hat + sqrt(t_next^2 - std^2)*x1_hat with x0_hat = x - t*v and
          x1_hat = x + (1 - t)*v; x_next = mean + std*noise. Its "log-prob" is flow_grpo's -mean((x' - mean)^2)
          (no variance term: only differences of it, the ratio, are used; the last step has std 0).
- `ode`  : the Euler step x + v*dt; no randomness, log-prob 0 (steps outside a sliding SDE window).

Each returns (x_next, logprob (B,), mean, std (B,)): give `noise` to sample or `x_next` to score.
"""
from __future__ import annotations

import math

import torch

SDE_TYPES = ("sde", "cps")


def _prepare(velocity, x, *times):
    v, x = velocity.float(), x.float()
    shape = (-1,) + (1,) * (x.dim() - 1)
    return (v, x, *(u.float().view(shape) for u in times))


def _next(mean, std, noise, x_next):
    if x_next is None:
        if noise is None:
            raise ValueError("a stochastic step needs `noise` to sample or `x_next` to score")
        x_next = mean + std * noise.float()
    return x_next.float()


def sde_step(velocity: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, noise_level: float,
             t_cap: torch.Tensor, noise: torch.Tensor | None = None, x_next: torch.Tensor | None = None):
    """Flow-GRPO's stochastic Euler step. `t_cap` replaces t in 1/(1 - t) where t = 1 (the first step of
    a schedule starting at pure noise would otherwise have infinite noise): the schedule's second time."""
    v, x, t, t_next, t_cap = _prepare(velocity, x, t, t_next, t_cap)
    dt = t_next - t
    t_safe = torch.where(t >= 1, t_cap, t)
    sigma_t = noise_level * torch.sqrt(t / (1 - t_safe))
    mean = x * (1 + sigma_t ** 2 / (2 * t) * dt) + v * (1 + sigma_t ** 2 * (1 - t) / (2 * t)) * dt
    std = sigma_t * torch.sqrt(-dt)
    x_next = _next(mean, std, noise, x_next)
    logp = -((x_next - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return x_next, logp.mean(dim=tuple(range(1, x.dim()))), mean, std.view(-1)


def cps_step(velocity: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, noise_level: float,
             t_cap: torch.Tensor | None = None, noise: torch.Tensor | None = None, x_next: torch.Tensor | None = None):
    """Coefficients-preserving step: the predicted x0 and noise are recombined at t_next with the noise
    share std keeps, so the marginal stays on the flow's interpolation path (fewer SDE artefacts)."""
    v, x, t, t_next = _prepare(velocity, x, t, t_next)
    std = t_next * math.sin(noise_level * math.pi / 2)
    x0_hat, x1_hat = x - t * v, x + (1 - t) * v
    mean = (1 - t_next) * x0_hat + torch.sqrt((t_next ** 2 - std ** 2).clamp(min=0)) * x1_hat
    x_next = _next(mean, std, noise, x_next)
    logp = -((x_next - mean) ** 2)
    return x_next, logp.mean(dim=tuple(range(1, x.dim()))), mean, std.view(-1)


def ode_step(velocity: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, *args, **kwargs):
    """The deterministic Euler step (noise and x_next are ignored); log-prob 0, std 0."""
    v, x, t, t_next = _prepare(velocity, x, t, t_next)
    mean = x + v * (t_next - t)
    zeros = torch.zeros(x.shape[0], device=x.device)
    return mean, zeros, mean, zeros


STEPS = {"sde": sde_step, "cps": cps_step, "ode": ode_step}


def gaussian_mean_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two transition Gaussians with the same std, per sample (mean over dimensions)."""
    d = (mean.float() - mean_ref.float()) ** 2
    return d.mean(dim=tuple(range(1, d.dim()))) / (2 * std.float() ** 2)


def sample_noise(seeds: list[int], num_steps: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial noise (B, *shape) and per-step noises (B, K, *shape); each row depends on its seed alone."""
    x0, steps = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        x0.append(torch.randn(shape, generator=g))
        steps.append(torch.randn((num_steps, *shape), generator=g))
    return torch.stack(x0), torch.stack(steps)


def sde_window_mask(seeds: list[int], num_steps: int, window: dict | None, step: int = 0) -> torch.Tensor:
    """(B, K) bool: which steps are stochastic (SDE or CPS; the others are ODE steps).

    window: None / size 0 = every step. Otherwise {"size", "range": [r0, r1], "schedule", "shift_every"}:
    - `random` (Flow-GRPO-Fast): start ~ U{r0, ..., r1 - size}, drawn per sample from its seed (flow_grpo
      draws one start per sampling call; per sample keeps a sample independent of its batch);
    - `sliding` (MixGRPO): start = r0 + (step // shift_every) mod (r1 - size - r0 + 1): the window moves
      one step every shift_every training steps and rolls back to r0 after the last position.
    """
    B = len(seeds)
    if not window or not window.get("size"):
        return torch.ones(B, num_steps, dtype=torch.bool)
    size = int(window["size"])
    r0, r1 = window.get("range") or (0, num_steps)
    r1 = min(int(r1), num_steps)
    positions = max(1, r1 - size - int(r0) + 1)
    if window.get("schedule", "random") == "sliding":
        starts = [int(r0) + (step // max(1, int(window.get("shift_every", 1)))) % positions] * B
    else:
        starts = [int(r0) + int(torch.randint(positions, (1,), generator=torch.Generator().manual_seed(
            (int(s) * 2654435761 + 97) % (2 ** 63))).item()) for s in seeds]
    mask = torch.zeros(B, num_steps, dtype=torch.bool)
    for i, s in enumerate(starts):
        mask[i, s:s + size] = True
    return mask
