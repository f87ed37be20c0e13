"""State nll: the negative log-likelihood of held-out images in bits per dimension, as DDPM's
Table 1 reports it: the variational bound of Eq. 5 (Diffusion/Likelihood.py) with the network
of sampling (the EMA weights, the speed options; for the class-conditional model, the guided
estimate of each w with the images' own classes), over all T steps with the model's fixed
variance (`variance`). Under torchrun each process scores its share of the batches.
"""
import math

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from Diffusion.Likelihood import variational_bound
from Diffusion.Machinery.Data import (
    image_folder,
    is_torchvision_dataset,
    torchvision_dataset,
    training_transform,
)
from Diffusion.Machinery.Errors import ConfigError
from Diffusion.Machinery.Evaluation import samplers_of, trained_model
from Diffusion.Machinery.Export import batch_seed
from Diffusion.Machinery.Processes import sum_over_processes, torchrun_processes

TERMS = ("total", "prior", "diffusion", "decoder")


def held_out_images(config, num_labels):
    """nll_dataset (a folder; with a subfolder per class for the conditional model, of its
    num_labels classes) or the test split of the torchvision dataset `dataset`, as the model
    sees them ([-1, 1], img_size, img_channels, no flip): its first nll_images images (None:
    all)."""
    transform = training_transform(config["img_size"], config["img_channels"])
    if config["nll_dataset"] is not None:
        images = image_folder(config["nll_dataset"], transform, labelled=num_labels is not None)
    elif is_torchvision_dataset(config["dataset"]):
        images = torchvision_dataset(config["dataset"], config["data_root"], transform, train=False)
    else:
        raise ConfigError(f"state nll scores held-out images, and dataset {config['dataset']!r} is a "
                          f"folder, which has no test split: set nll_dataset to a folder of "
                          f"held-out images.")
    classes = getattr(images, "classes", None) or []
    if num_labels is not None and len(classes) != num_labels:
        raise ConfigError(f"the checkpoint knows {num_labels} classes, but the held-out images have "
                          f"{len(classes)}: give held-out images of the same classes (nll_dataset).")
    if config["nll_images"] is not None and config["nll_images"] < len(images):
        images = Subset(images, range(config["nll_images"]))
    return images


def likelihood(config, pieces):
    """Print and return {name: {term: (mean, standard error)}} in bits/dim, one name per guidance
    weight ("w = 1.8: "; the unconditional model's: ""): the bound ("total") and its parts, the
    prior L_T, the sum of the KL terms ("diffusion") and the decoder L_0."""
    with torchrun_processes(config["device"]) as processes:
        config = processes.on_its_device(config)
        model, num_labels = trained_model(config, pieces, processes.device)
        images = held_out_images(config, num_labels)
        full_chain = {**config, "sampler": "ddpm", "sample_steps": None}  # all T steps
        results = {}
        for w, sampler in samplers_of(full_chain, pieces, model, pieces.layout.weights_of(config)):
            sums = bound_sums(images, sampler, num_labels, config, processes)
            name = "" if w is None else f"w = {w:g}: "
            results[name] = mean_and_error(sum_over_processes(sums, processes).tolist())
            if processes.is_main:
                report(name, results[name], len(images), config)
        return results


def bound_sums(images, sampler, num_labels, config, processes):
    """Over this process's share of the batches: [sum of each term, sum of squared totals,
    images], float64 [6]. Batch b draws its noise from a seed of (seed, b), as the export does:
    the same numbers whatever the number of processes."""
    loader = DataLoader(images, batch_size=config["batch_size"], num_workers=config["num_workers"])
    mine = [b for b in range(len(loader)) if b % processes.world_size == processes.rank]
    sums = torch.zeros(len(TERMS) + 2, dtype=torch.float64, device=processes.device)
    with tqdm(total=len(mine) * sampler.T, desc="nll", unit="step", dynamic_ncols=True,
              disable=not processes.is_main) as bar:
        for batch, (x_0, labels) in enumerate(loader):
            if batch not in mine:
                continue
            x_0 = x_0.to(processes.device)
            condition = () if num_labels is None else (labels.to(processes.device) + 1,)
            generator = torch.Generator(processes.device).manual_seed(batch_seed(config["seed"] or 0, batch))
            bound = variational_bound(x_0, lambda x_t, t: sampler.p_mean_variance(x_t, t, *condition),
                                      sampler.alphas_bar, generator, on_step=bar.update)
            count = torch.tensor(float(len(x_0)), dtype=torch.float64, device=processes.device)
            sums += torch.stack([bound[term].sum() for term in TERMS] + [bound["total"].square().sum(), count])
    return sums


def mean_and_error(sums):
    """{term: (mean, standard error of the mean)} from bound_sums' sums (the error of the parts
    is left out: None)."""
    count, square = sums[-1], sums[-2]
    mean = {term: total / count for term, total in zip(TERMS, sums)}
    variance = max(square / count - mean["total"] ** 2, 0.) * count / max(count - 1, 1)
    return {term: (mean[term], math.sqrt(variance / count) if term == "total" else None) for term in TERMS}


def report(name, result, count, config):
    total, error = result["total"]
    tqdm.write(f"{name}NLL <= {total:.3f} ± {error:.3f} bits/dim (the bound of DDPM Eq. 5, mean and "
               f"standard error over {count} held-out images, {config['variance']} variance): prior L_T "
               f"{result['prior'][0]:.4f}, KL terms {result['diffusion'][0]:.3f}, decoder L_0 "
               f"{result['decoder'][0]:.3f}")
