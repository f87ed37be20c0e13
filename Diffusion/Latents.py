"""What the latents x_t of DDPM hold (Ho et al. 2020, Sec. 4.3 and 4.4), read off a sampler over
all T steps; t is the paper's: x_t for t = 1..T is the input of the sampler's position t - 1, and
x_0 is the image.

- Samples that share a latent (Fig. 7): one chain from x_T, frozen at x_t for several t, and
  several x_0 ~ p_theta(x_0 | x_t) drawn from each: from a small t they share all but fine
  detail, from a large t only the coarse layout.
- Interpolation (Fig. 8): two images encoded by q(x_t | x_0) with the same noise, mixed
  linearly, x_t(lambda) = (1 - lambda) x_t + lambda x'_t, and each mix decoded by the reverse
  process with the same noise for every lambda; coarse to fine (Fig. 9): the same at several t,
  a pixel blend at t = 0, new images at t = T.
"""
import torch


def encode(sampler, x_0, t, noise):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise ~ q(x_t | x_0) (Eq. 4) at the paper's
    t = 0..T (x_0 itself at t = 0), with the schedule of `sampler`. [B, C, H, W]."""
    if t == 0:
        return x_0
    return sampler.sqrt_alphas_bar[t - 1] * x_0 + sampler.sqrt_one_minus_alphas_bar[t - 1] * noise


def decode(sampler, x_t, t, *condition, progress=False):
    """x_0 ~ p_theta(x_0 | x_t): the reverse process from the paper's t (x_t itself at t = 0),
    with `sampler` over all T steps. x_t [B, C, H, W] -> [B, C, H, W]."""
    if t == 0:
        return x_t
    return sampler(x_t, *condition, start=t - 1, progress=progress)


def interpolate(sampler, x_0, x_0_other, t, lambdas, *condition, seed=0, progress=False):
    """Fig. 8: the decodes of (1 - lambda) x_t + lambda x'_t for each lambda of `lambdas`, x_t and
    x'_t encoding x_0 and x_0_other [B, C, H, W] with the same noise; each decode's noise is drawn
    after torch.manual_seed(seed), the same for every lambda. Returns [len(lambdas), B, C, H, W].
    At lambda = 0 and 1 these are the decodes of x_t and x'_t; at t = 0 the pixel blend."""
    noise = torch.randn_like(x_0)
    x_t, x_t_other = encode(sampler, x_0, t, noise), encode(sampler, x_0_other, t, noise)
    mixes = []
    for mix in lambdas:
        torch.manual_seed(seed)
        mixes.append(decode(sampler, (1. - mix) * x_t + mix * x_t_other, t, *condition, progress=progress))
    return torch.stack(mixes)


def shared_latent_samples(sampler, x_T, steps, count, *condition, progress=False):
    """Fig. 7: a reverse chain from x_T [B, C, H, W], its x_t kept at each paper's t of `steps`
    (1..T), and `count` samples of p_theta(x_0 | x_t) from each. Returns (the kept x_t
    [len(steps), B, C, H, W], their samples [len(steps), count, B, C, H, W])."""
    wanted, kept = set(steps), {}
    paper_t = iter(range(len(sampler.timesteps), 0, -1))  # the x_t of each step, in turn

    def keep(x_t, x_0):
        t = next(paper_t)
        if t in wanted:
            kept[t] = x_t

    sampler(x_T, *condition, on_step=keep, progress=progress)
    latents = torch.stack([kept[t] for t in steps])
    samples = [decode(sampler, latent.repeat(count, 1, 1, 1), t, *(c.repeat(count) for c in condition),
                      progress=progress)
               for t, latent in zip(steps, latents)]
    return latents, torch.stack([sample.unflatten(0, (count, x_T.shape[0])) for sample in samples])
