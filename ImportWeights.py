"""Convert the DDPM authors' released models to this repo's checkpoint format: CIFAR-10 (32x32)
and CelebA-HQ, LSUN church, bedroom and cat (256x256), EMA or raw weights (docs/checkpoints.md).

    huggingface-cli download google/ddpm-ema-church-256 --local-dir ddpm-ema-church-256
    python ImportWeights.py ddpm-ema-church-256     # writes CheckPoints/official_ddpm_church_ema/
    python Main.py --config CheckPoints/official_ddpm_church_ema/config.json

SOURCE is a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors or
.bin, and the scheduler's scheduler_config.json where it has one) or a weights file in diffusers'
or pesser/pytorch_diffusion's names (e.g. pesser's ema_diffusion_lsun_church_model/model-4432000.ckpt).
The folder gets ckpt_official_.pt and a config.json of Main.py's keys that samples from it.
"""
import argparse
import os
import re
import sys

from Conversion.Import import describe, import_weights, write_imported
from Diffusion.Run.Checkpoints import TIME_TABLE

# The released models' datasets, as their names spell them: (words in the name, folder name).
DATASETS = ((("cifar10",), "cifar10"), (("celebahq", "celeba"), "celebahq"), (("church",), "church"),
            (("bedroom",), "bedroom"), (("cat",), "cat"))


def default_out(source):
    """CheckPoints/official_ddpm_<dataset>[_ema], the dataset and EMA read off the source's path
    (CheckPoints/official_ddpm where its name says neither)."""
    words = set(re.split(r"[^a-z0-9]+", os.path.normpath(source).lower().replace("celeba_hq", "celebahq")))
    dataset = next((name for spellings, name in DATASETS if words & set(spellings)), None)
    name = "official_ddpm" + (f"_{dataset}" if dataset else "") + ("_ema" if "ema" in words else "")
    return os.path.join("CheckPoints", name)


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE",
                        help="a diffusers UNet2DModel folder or a weights file")
    parser.add_argument("--out", metavar="FOLDER",
                        help="folder to write the checkpoint and config.json to (default: "
                             "CheckPoints/official_ddpm_<dataset>[_ema], named after SOURCE)")
    parser.add_argument("--T", type=int,
                        help="diffusion steps the model was trained with: the rows of the time "
                             "table and the config's T (default: the scheduler's "
                             "num_train_timesteps where the folder has one, else 1000)")
    parser.add_argument("--img_size", type=int,
                        help="the images' size (default: the folder's sample_size, else the "
                             "released model's of the architecture: 32 or 256)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    out = args.out or default_out(args.source)
    try:
        state_dict, config = import_weights(args.source, args.T, args.img_size)
        checkpoint, config_path = write_imported(state_dict, config, out)
    except ValueError as error:  # ConfigError included
        sys.exit(f"error: {error}")
    parameters = sum(tensor.numel() for key, tensor in state_dict.items() if key != TIME_TABLE)
    architecture = {key: config[key] for key in ("img_size", "channel", "channel_mult", "attn", "num_res_blocks")}
    print(f"wrote {checkpoint}: {describe(architecture)} ({parameters / 1e6:.1f}M parameters "
          f"besides the time-embedding table)")
    print(f"wrote {config_path}")
    print(f"sample a grid with:\n  python Main.py --config {config_path}")


if __name__ == "__main__":
    main()
