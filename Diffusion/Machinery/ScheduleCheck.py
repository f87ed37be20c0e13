"""Whether the noise schedule turns every image into pure noise by step T.

Training sees x_T = sqrt(alphas_bar_T) x_0 + sqrt(1 - alphas_bar_T) eps (DDPM Eq. 4), while
Algorithm 2 starts sampling from x_T ~ N(0, I). When sqrt(alphas_bar_T), the share of the image
left in x_T, is not small, the model never learns to start from noise without an image in it,
and its samples stay noise-like. The original's two configs leave 0.6% (T 1000, beta_T 0.02)
and 3% (T 500, beta_T 0.028); T 200 with beta_T 0.02 leaves 37%; the cosine schedule leaves
none at any T.
"""
import math
import sys

import torch
from tqdm import tqdm

from Diffusion.Schedule import betas_of

SIGNAL_LEFT_LIMIT = 0.05  # the largest share of x_0 in x_T that goes without a warning
LARGEST_BETA = 0.999  # a beta_T suggested must stay below 1


def signal_left_at_T(beta_1, beta_T, T, beta_schedule="linear"):
    """sqrt(alphas_bar_T) = sqrt(prod_t (1 - beta_t)) of the schedule: the factor of x_0 in x_T."""
    return math.sqrt(torch.prod(1. - betas_of(beta_schedule, beta_1, beta_T, T)).item())


def _round_up(value, significant_digits=2):
    scale = 10. ** (math.floor(math.log10(value)) - significant_digits + 1)
    return round(math.ceil(value / scale) * scale, 12)


def beta_T_that_removes_the_signal(beta_1, T, limit=SIGNAL_LEFT_LIMIT):
    """The smallest beta_T, rounded up to two significant digits (more when close to 1), whose linear schedule from
    beta_1 over T steps leaves less than `limit` of x_0 in x_T; None when no beta_T < 1 does.
    The signal left falls as beta_T grows, so bisection finds it."""
    low, high = beta_1, LARGEST_BETA
    if signal_left_at_T(beta_1, high, T) >= limit:
        return None
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (low, middle) if signal_left_at_T(beta_1, middle, T) < limit else (middle, high)
    # Two significant digits, more where rounding up would reach LARGEST_BETA (very small T).
    for digits in range(2, 16):
        rounded = _round_up(high, digits)
        if rounded <= LARGEST_BETA:
            return rounded
    return high


def warn_if_x_T_keeps_the_image(beta_1, beta_T, T, beta_schedule="linear"):
    """One warning line on stderr when the schedule leaves more than SIGNAL_LEFT_LIMIT of x_0
    in x_T, with the numbers and a beta_T that fixes it."""
    left = signal_left_at_T(beta_1, beta_T, T, beta_schedule)
    if left <= SIGNAL_LEFT_LIMIT:
        return
    fix = beta_T_that_removes_the_signal(beta_1, T)
    advice = (f"--beta_T {fix:g} brings it under {SIGNAL_LEFT_LIMIT:.0%}" if fix is not None else
              f"no beta_T below 1 brings it under {SIGNAL_LEFT_LIMIT:.0%} in {T} steps: raise T")
    tqdm.write(f"warning: the schedule beta_1 {beta_1:g} .. beta_T {beta_T:g} over T {T} steps "
               f"leaves sqrt(alphas_bar_T) = {left:.1%} of the image in x_T, but sampling starts "
               f"from pure noise, so samples stay noise-like; {advice}.", file=sys.stderr)
