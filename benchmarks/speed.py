"""Speed of the default models, measured in one run on one machine.

    python benchmarks/speed.py                 # CUDA if present, else CPU
    python benchmarks/speed.py --batch_size 16 --device cpu

Prints a markdown table: training and sampling throughput of Main.py's and MainCondition.py's
default UNets, and two ratios that justify choices in the code: scaled_dot_product_attention
against the explicit softmax(q k^T / sqrt(C)) v of the original, and the guided noise estimate
from one forward pass over 2B against two passes over B.
"""
import argparse
import importlib
import platform
import sys
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from Diffusion.Diffusion import GaussianDiffusionTrainer  # noqa: E402
from Diffusion.Run.Config import defaults  # noqa: E402
from Diffusion.Model import AttnBlock  # noqa: E402
from Diffusion.Train import unet_of  # noqa: E402
from DiffusionFreeGuidence.DiffusionCondition import ClassifierFreeGuidance  # noqa: E402
from DiffusionFreeGuidence.TrainCondition import unet_of as conditional_unet_of  # noqa: E402


def script_defaults(script_name):
    """Every key of Main.py or MainCondition.py with its default."""
    from Diffusion.Train import UNCONDITIONAL
    from DiffusionFreeGuidence.TrainCondition import CONDITIONAL
    variant = {"Main": UNCONDITIONAL, "MainCondition": CONDITIONAL}[script_name]
    return defaults(variant.keys, importlib.import_module(script_name).modelConfig)


def cpu_name():
    """The CPU's model name (Linux), else its architecture."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def seconds(function, min_run_time):
    """Median seconds per call of function(), synchronising CUDA around each measurement."""
    return Timer(stmt="function()", globals={"function": function}).blocked_autorange(
        min_run_time=min_run_time).median


def explicit_attention(block, x):
    """The original's attention: bmm, softmax, bmm. [B, C, H, W] -> [B, C, H, W]."""
    B, C, H, W = x.shape
    h = block.group_norm(x)
    q = block.proj_q(h).permute(0, 2, 3, 1).reshape(B, H * W, C)
    k = block.proj_k(h).reshape(B, C, H * W)
    v = block.proj_v(h).permute(0, 2, 3, 1).reshape(B, H * W, C)
    weights = F.softmax(torch.bmm(q, k) * C ** -0.5, dim=-1)
    h = torch.bmm(weights, v).reshape(B, H, W, C).permute(0, 3, 1, 2)
    return x + block.proj(h)


def training_step(model, trainer, optimizer, x_0, *condition):
    optimizer.zero_grad(set_to_none=True)
    trainer(x_0, *condition).sum().backward()
    optimizer.step()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=None, help="default: 80 on CUDA, 8 on CPU")
    parser.add_argument("--min_run_time", type=float, default=2.)
    args = parser.parse_args()
    device = torch.device(args.device)
    B = args.batch_size or (80 if device.type == "cuda" else 8)
    torch.manual_seed(0)
    rows = []

    for name, config, build in (("Main.py", script_defaults("Main"), lambda c: unet_of(c)),
                                ("MainCondition.py", script_defaults("MainCondition"),
                                 lambda c: conditional_unet_of(c, num_labels=10))):
        model = build({**config, "device": args.device}).to(device)
        x = torch.randn(B, 3, 32, 32, device=device)
        condition = (torch.randint(1, 11, (B,), device=device),) if "Condition" in name else ()
        trainer = GaussianDiffusionTrainer(model, config["beta_1"], config["beta_T"], config["T"]).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()
        step = seconds(lambda: training_step(model, trainer, optimizer, x, *condition), args.min_run_time)
        rows.append((f"{name} training step (B={B})", f"{B / step:.1f} images/s"))
        model.eval()
        t = torch.full((B,), 10, device=device)
        with torch.no_grad():
            if condition:
                guided = ClassifierFreeGuidance(model, w=1.8)
                one_pass = seconds(lambda: guided(x, t, condition[0]), args.min_run_time)
                two_passes = seconds(lambda: (model(x, t, condition[0]), model(x, t, torch.zeros_like(condition[0]))),
                                     args.min_run_time)
                rows.append((f"{name} guided sampling step (B={B})", f"{B / one_pass:.1f} images/s"))
                rows.append(("guided estimate: two passes / one pass over 2B", f"{two_passes / one_pass:.2f}x"))
            else:
                forward = seconds(lambda: model(x, t), args.min_run_time)
                rows.append((f"{name} sampling step (B={B})", f"{B / forward:.1f} images/s"))

    block = AttnBlock(384).to(device).eval()  # Main.py's attention level: 384 channels at 8x8
    h = torch.randn(B, 384, 8, 8, device=device)
    with torch.no_grad():
        sdpa = seconds(lambda: block(h), args.min_run_time)
        explicit = seconds(lambda: explicit_attention(block, h), args.min_run_time)
    rows.append(("attention 384ch 8x8: explicit / scaled_dot_product_attention", f"{explicit / sdpa:.2f}x"))

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"torch {torch.__version__}, {device.type}: {machine}, {torch.get_num_threads()} CPU threads\n")
    print("| measurement | result |\n| --- | --- |")
    for measurement, result in rows:
        print(f"| {measurement} | {result} |")


if __name__ == "__main__":
    main()
