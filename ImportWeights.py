"""Convert the DDPM authors' CIFAR-10 model to this repo's checkpoint format.

    huggingface-cli download google/ddpm-cifar10-32 --local-dir ddpm-cifar10-32
    python ImportWeights.py ddpm-cifar10-32            # writes CheckPoints/official_ddpm_cifar10/
    python Main.py --config CheckPoints/official_ddpm_cifar10/config.json

SOURCE is a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors or
.bin) or a weights file in diffusers' or pesser/pytorch_diffusion's names (e.g. pesser's
ema_diffusion_cifar10_model/model-790000.ckpt). The folder gets ckpt_official_.pt and a
config.json of Main.py's keys that samples from it.
"""
import argparse
import os
import sys

from Conversion.Import import OFFICIAL_SCHEDULE, describe, import_weights, write_imported
from Diffusion.Run.Checkpoints import TIME_TABLE

DEFAULT_OUT = os.path.join("CheckPoints", "official_ddpm_cifar10")


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE",
                        help="a diffusers UNet2DModel folder or a weights file")
    parser.add_argument("--out", metavar="FOLDER", default=DEFAULT_OUT,
                        help=f"folder to write the checkpoint and config.json to (default: {DEFAULT_OUT})")
    parser.add_argument("--T", type=int, default=OFFICIAL_SCHEDULE["T"],
                        help="diffusion steps the model was trained with: the rows of the time "
                             "table and the config's T (default: 1000, the official model's; for "
                             "your own diffusers model, its scheduler's num_train_timesteps)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    try:
        state_dict, config = import_weights(args.source, args.T)
        checkpoint, config_path = write_imported(state_dict, config, args.out)
    except ValueError as error:  # ConfigError included
        sys.exit(f"error: {error}")
    parameters = sum(tensor.numel() for key, tensor in state_dict.items() if key != TIME_TABLE)
    architecture = {key: config[key] for key in ("channel", "channel_mult", "attn", "num_res_blocks")}
    print(f"wrote {checkpoint}: {describe(architecture)} ({parameters / 1e6:.1f}M parameters "
          f"besides the time-embedding table)")
    print(f"wrote {config_path}")
    print(f"sample a grid with:\n  python Main.py --config {config_path}")


if __name__ == "__main__":
    main()
