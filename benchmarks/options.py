"""Speed and memory of the training step, and speed of sampling, with each speed option,
measured in one run.

    python benchmarks/options.py                          # Main.py's model, CUDA if present
    python benchmarks/options.py --model condition --batch_size 8 --device cpu
    python benchmarks/options.py --variants plain,bf16 --rounds 5

Every variant is the training step of Diffusion/Train.py's fit, built from its parts (the
loss of Algorithm 1, `optimizer_step`: clipping and AdamW, the EMA update) on the default config
of the chosen script; "plain" is the original's float32 path
with every option off (AdamW not fused) and the model's attention (Model.attention: fused on a
GPU, matmul-softmax-matmul on a CPU); "matmul attention" puts the original's bmm attention in its
place on any device. The variants' steps alternate, round after round, so
that a machine that slows down or speeds up affects them alike; the table gives the median
images per second over the rounds, the ratio to plain, and the memory the step takes above what
was allocated before it (CUDA: peak allocated; CPU: peak resident set). Sampling is timed the
same way: `--sample_steps` DDIM steps of the same batch through sampler_of, under the variant's
options (AdamW's doesn't apply), in images x steps per second. On CUDA it adds the
model FLOPs utilisation of the best combination: FLOPs per image from
torch.utils.flop_counter.FlopCounterMode, against the GPU's bf16 peak (--peak_tflops).
"""
import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.speed import cpu_name, explicit_attention, script_defaults  # noqa: E402
from Diffusion.Diffusion import GaussianDiffusionTrainer  # noqa: E402
from Diffusion.EMA import EMA  # noqa: E402
from Diffusion.Model import AttnBlock  # noqa: E402
from Diffusion.Run.Data import flip_left_right_at_random  # noqa: E402
from Diffusion.Run.Processes import GlobalBatchRandomness, autocast, compiled, memory_format  # noqa: E402
from Diffusion.Run.Sampling import sampler_of, under_speed_options  # noqa: E402
from Diffusion.Train import UNCONDITIONAL, backward, optimizer_step  # noqa: E402
from DiffusionFreeGuidence.ModelCondition import UNet as ConditionalUNet  # noqa: E402
from DiffusionFreeGuidence.TrainCondition import CONDITIONAL  # noqa: E402

OPTIONS_OFF = {"amp": "none", "compile": False, "channels_last": False, "fused": False, "attention": "by device"}
VARIANTS = {
    "plain": {},
    "bf16": {"amp": "bf16"},
    "fp16": {"amp": "fp16"},
    "channels_last": {"channels_last": True},
    "fused AdamW": {"fused": True},
    "compile": {"compile": True},
    "matmul attention": {"attention": "matmul"},
    "best": None,  # the best combination for the device, below
}
BF16_PEAK_TFLOPS = {"H100": 989., "H200": 989., "A100": 312., "L40S": 362., "RTX 4090": 165.}


def best_options(device):
    on_gpu = device.type == "cuda"
    return {"amp": "bf16", "channels_last": on_gpu, "fused": True, "compile": on_gpu}


class Setup:
    """A model, optimizer and EMA set up with one combination of options, and its step."""

    def __init__(self, options, script, batch_size, device):
        self.options, self.device = options, device
        base = script_defaults(script)
        self.config = {**base, "device": str(device), "batch_size": batch_size,
                       **{key: options[key] for key in ("amp", "compile", "channels_last")}}
        self.variant = CONDITIONAL if script == "MainCondition" else UNCONDITIONAL
        model = self.variant.unet(self.config, 10)
        if options["attention"] == "matmul":
            for block in model.modules():
                if isinstance(block, AttnBlock):
                    block.forward = types.MethodType(explicit_attention, block)
        self.model = model.to(device, memory_format=memory_format(options["channels_last"]))
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=base["lr"], weight_decay=1e-4,
                                           fused=options["fused"])
        self.scaler = torch.amp.GradScaler(device.type, enabled=options["amp"] == "fp16")
        self.ema = EMA(model, base["ema_decay"])
        self.trainer = GaussianDiffusionTrainer(compiled(model, options["compile"], announce=False), base["beta_1"],
                                                base["beta_T"], base["T"]).to(device)
        self.draws = GlobalBatchRandomness(torch.Generator(device).manual_seed(0))
        self.condition_of = self.variant.condition(self.config)
        self.images = torch.rand(batch_size, 3, 32, 32) * 2 - 1
        self.labels = torch.randint(10, (batch_size,))

    def step(self):
        """The body of Train.fit's loop."""
        x_0 = flip_left_right_at_random(self.images.to(self.device, non_blocking=True), self.draws)
        condition = self.condition_of(self.labels.to(self.device, non_blocking=True), self.draws)
        t, noise = self.draws.randint(self.config["T"], len(x_0), self.device), self.draws.randn_like(x_0)
        with autocast(self.device, self.options["amp"]):
            error = self.trainer(x_0.contiguous(memory_format=memory_format(self.options["channels_last"])),
                                 *condition, t=t, noise=noise)
            loss = self.variant.loss(error, len(x_0))
        backward(loss, self.scaler)
        if optimizer_step(self.model, self.optimizer, self.scaler, self.config["grad_clip"]):
            self.ema.update(self.model)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_mark(device):
    """Start measuring the peak; returns the amount in use now (MiB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2 ** 20
    with open("/proc/self/clear_refs", "w") as refs:  # resets the peak resident set (Linux)
        refs.write("5")
    return _status_mib("VmRSS")


def memory_peak(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return _status_mib("VmHWM")


def _status_mib(field):
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def measure(variant, steps, device):
    """(images per second, MiB the steps took above what was in use before them)."""
    before = memory_mark(device)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        variant.step()
    synchronize(device)
    seconds = time.perf_counter() - started
    return steps * variant.config["batch_size"] / seconds, memory_peak(device) - before


def measure_sampling(variant, steps, device):
    """Images x sampling steps per second of the variant's model under its options."""
    config = {**variant.config, "sampler": "ddim", "sample_steps": steps, "eta": 0.}
    model = variant.model.eval()
    sampler = sampler_of(config, under_speed_options(model, config["amp"], config["compile"],
                                                     config["channels_last"], config["device"]))
    x_T = torch.randn(variant.config["batch_size"], 3, 32, 32, device=device)
    labels = (variant.labels.to(device) + 1,) if isinstance(model, ConditionalUNet) else ()
    sampler(x_T, *labels, progress=False)  # warm-up (compiles)
    synchronize(device)
    started = time.perf_counter()
    sampler(x_T, *labels, progress=False)
    synchronize(device)
    model.train()
    return steps * variant.config["batch_size"] / (time.perf_counter() - started)


def flops_per_image(variant):
    """FLOPs of one training step (forward and backward of the UNet) per image."""
    with FlopCounterMode(display=False) as counter:
        variant.step()
    return counter.get_total_flops() / variant.config["batch_size"]


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["main", "condition"], default="main")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=None, help="default: 128 on CUDA, 8 on CPU")
    parser.add_argument("--variants", default=None, help="comma-separated names (default: all the device has)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="steps per measurement (default: 20 CUDA, 2 CPU)")
    parser.add_argument("--sample_steps", type=int, default=None, help="DDIM steps timed (default: 50 CUDA, 5 CPU)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="bf16 peak of the GPU (default: by name)")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    batch_size = args.batch_size or (128 if on_gpu else 8)
    steps = args.steps or (20 if on_gpu else 2)
    script = "MainCondition" if args.model == "condition" else "Main"
    names = args.variants.split(",") if args.variants else [n for n in VARIANTS if on_gpu or n != "fp16"]
    variants = {}
    for name in names:
        options = {**OPTIONS_OFF, **(VARIANTS[name] if VARIANTS[name] is not None else best_options(device))}
        variants[name] = Setup(options, script, batch_size, device)
        for _ in range(3 if options["compile"] else 1):  # warm-up (compiles)
            variants[name].step()
    results = {name: [] for name in variants}
    sampling = {name: [] for name in variants}
    sample_steps = args.sample_steps or (50 if on_gpu else 5)
    for _ in range(args.rounds):
        for name, variant in variants.items():
            results[name].append(measure(variant, steps, device))
            sampling[name].append(measure_sampling(variant, sample_steps, device))

    print(f"{script}.py's model, batch {batch_size}, {steps} steps x {args.rounds} rounds, "
          f"torch {torch.__version__}, {device.type}: {machine(device)}\n")
    print("| variant | options | training images/s | vs plain | step memory (MiB) | sampling images x steps/s | vs plain |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    plain = statistics.median(rate for rate, _ in results["plain"]) if "plain" in results else None
    plain_sampling = statistics.median(sampling["plain"]) if "plain" in sampling else None
    for name, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        memory = max(m for _, m in runs)
        sampled = statistics.median(sampling[name])
        options = {k: v for k, v in variants[name].options.items() if v != OPTIONS_OFF[k]}
        ratio = f"{rate / plain:.2f}x" if plain else "-"
        sampling_ratio = f"{sampled / plain_sampling:.2f}x" if plain_sampling else "-"
        print(f"| {name} | {options or 'all off'} | {rate:.1f} | {ratio} | {memory:.0f} | {sampled:.1f} | {sampling_ratio} |")
    if on_gpu and "best" in results:
        peak = args.peak_tflops or next((p for key, p in BF16_PEAK_TFLOPS.items() if key in machine(device)), None)
        flops = flops_per_image(Setup({**OPTIONS_OFF, "fused": True}, script, batch_size, device))
        rate = statistics.median(r for r, _ in results["best"])
        utilisation = f"{100 * rate * flops / (peak * 1e12):.1f}% of {peak:g} TFLOPS" if peak else "(peak unknown)"
        print(f"\nbest: {flops / 1e9:.1f} GFLOPs per image, model FLOPs utilisation {utilisation}")


if __name__ == "__main__":
    main()
