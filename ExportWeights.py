"""Export a checkpoint of Main.py's model to diffusers: a folder that
diffusers.DDPMPipeline.from_pretrained(folder) loads (docs/checkpoints.md).

    python ExportWeights.py --out ddpm-mine --config run.json --test_load_weight ckpt_199_.pt
    python -c "from diffusers import DDPMPipeline; DDPMPipeline.from_pretrained('ddpm-mine')().images[0].save('x.png')"

--out FOLDER (default: save_weight_dir/diffusers) gets unet/ (UNet2DModel), scheduler/
(DDPMScheduler: the config's T, betas, variance, clip_denoised and prediction), model_index.json
and a README.md model card; nothing is uploaded. The other keys are Main.py's (--help lists
them): the architecture and schedule the checkpoint was trained with, save_weight_dir,
test_load_weight, use_ema. A model that UNet2DModel cannot express exactly is refused, naming why.
"""
import argparse
import os
import sys

import Main
from Conversion.Export import export_to_diffusers
from Diffusion.Run.Checkpoints import check_trained_as_configured, load_into, weights_to_sample
from Diffusion.Run.Config import parse_command_line
from Diffusion.Train import UNCONDITIONAL, unet_of


def main(argv=None):
    front = argparse.ArgumentParser(add_help=False)
    front.add_argument("--out", metavar="FOLDER")
    args, rest = front.parse_known_args(sys.argv[1:] if argv is None else argv)
    config = parse_command_line(Main.modelConfig, UNCONDITIONAL.keys, UNCONDITIONAL.absent, rest, __doc__)
    folder, name = config["save_weight_dir"], config["test_load_weight"]
    out = args.out or os.path.join(folder, "diffusers")
    try:
        check_trained_as_configured(folder, config)
        state_dict = weights_to_sample(folder, name, config["use_ema"], "cpu")
        model = unet_of(config)
        load_into(model, state_dict, os.path.join(folder, name))
        export_to_diffusers(state_dict, config, model, out)
    except ValueError as error:  # ConfigError included
        sys.exit(f"error: {error}")
    print(f"wrote {out}: load it with diffusers.DDPMPipeline.from_pretrained({out!r})")


if __name__ == "__main__":
    main()
