"""diffusers' DDPMScheduler config.json and this repo's schedule keys, both ways.

A DDPMScheduler holds what Algorithm 2 needs besides the network: the betas (linear beta_1 ..
beta_T over T steps, or the cosine schedule of Nichol & Dhariwal, which diffusers calls
squaredcos_cap_v2: the same Eq. 17 clipped at 0.999), sigma_t^2 (fixed_large beta_t or
fixed_small, the posterior's), whether the predicted x_0 is clipped to [-1, 1], and what the
network predicts. Only values both sides express exactly are translated; any other is refused.
"""
from Diffusion.Run.Config import ConfigError

SCHEDULER_FOLDER = "scheduler"
SCHEDULER_CONFIG = "scheduler_config.json"

# this repo's value -> diffusers' value
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
VARIANCES = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}
PREDICTIONS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
# diffusers' defaults of the keys an older scheduler_config.json leaves out
SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                      "beta_schedule": "linear", "variance_type": "fixed_small", "clip_sample": True,
                      "prediction_type": "epsilon", "thresholding": False, "clip_sample_range": 1.0,
                      "trained_betas": None, "rescale_betas_zero_snr": False}
# Keys this repo's sampler has no counterpart of, with the only value it reproduces.
REPRODUCED_ONLY = {"thresholding": False, "clip_sample_range": 1.0, "trained_betas": None,
                   "rescale_betas_zero_snr": False}


def _translated(table, key, value, config_key):
    if value not in table:
        raise ConfigError(f"{config_key} {value!r} has no exact counterpart in diffusers' "
                          f"DDPMScheduler {key} (only {', '.join(map(repr, table))} have one).")
    return table[value]


def scheduler_config_of(config):
    """The DDPMScheduler config.json of a config of this repo (T, beta_1, beta_T, beta_schedule,
    variance, clip_denoised, prediction)."""
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": config["T"],
            "beta_start": config["beta_1"], "beta_end": config["beta_T"],
            "beta_schedule": _translated(BETA_SCHEDULES, "beta_schedule", config["beta_schedule"], "beta_schedule"),
            "variance_type": _translated(VARIANCES, "variance_type", config["variance"], "variance"),
            "clip_sample": bool(config["clip_denoised"]), "clip_sample_range": 1.0,
            "prediction_type": _translated(PREDICTIONS, "prediction_type", config["prediction"], "prediction"),
            **REPRODUCED_ONLY}


def _inverse(table, key, value, source):
    inverse = {theirs: ours for ours, theirs in table.items()}
    if value not in inverse:
        raise ConfigError(f"{source!r} has a scheduler with {key} {value!r}; this repo samples "
                          f"only {', '.join(map(repr, inverse))}.")
    return inverse[value]


def keys_of_scheduler_config(scheduler, source):
    """This repo's schedule keys from a DDPMScheduler config.json, after checking it describes a
    sampler this repo reproduces."""
    setting = {**SCHEDULER_DEFAULTS, **scheduler}
    for key, only in REPRODUCED_ONLY.items():
        if setting[key] != only:
            raise ConfigError(f"{source!r} has a scheduler with {key} {setting[key]!r}; this repo "
                              f"reproduces only {only!r}.")
    return {"T": setting["num_train_timesteps"], "beta_1": setting["beta_start"],
            "beta_T": setting["beta_end"],
            "beta_schedule": _inverse(BETA_SCHEDULES, "beta_schedule", setting["beta_schedule"], source),
            "variance": _inverse(VARIANCES, "variance_type", setting["variance_type"], source),
            "clip_denoised": bool(setting["clip_sample"]),
            "prediction": _inverse(PREDICTIONS, "prediction_type", setting["prediction_type"], source)}
