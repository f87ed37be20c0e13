"""The benchmarks' stand-in for the Inception network of FID, where Inception is too slow (a CPU)
or its numbers are not needed: a small CNN classifier trained on the dataset's labels, saved as
a TorchScript file that `--fid_extractor` takes (docs/fid.md). Its FID is not the papers'
Inception FID: compare its numbers only with each other, within one table.

    python benchmarks/sampling.py --speed none --fid_dir RUN ...   # trains RUN/classifier.pt if missing
"""
import os
import warnings

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, random_split

from Diffusion.Run.Metrics import reference_images


class StandInClassifier(nn.Module):
    """uint8 images [B, 3, H, W] -> (features [B, 4 * width], the input of the last layer;
    logits [B, num_classes])."""

    def __init__(self, num_classes=10, width=16):
        super().__init__()

        def conv(channels_in, channels_out):
            return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1),
                                 nn.GroupNorm(4, channels_out), nn.SiLU())
        self.body = nn.Sequential(conv(3, width), nn.MaxPool2d(2), conv(width, 2 * width), nn.MaxPool2d(2),
                                  conv(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, images):
        features = self.body(images.float() / 127.5 - 1.)
        return features, self.head(features)


def save_extractor(classifier, path):
    """`classifier` in eval mode as a TorchScript file at `path`, written to a temporary name and
    renamed."""
    temporary = f"{path}.tmp"
    with warnings.catch_warnings():  # TorchScript's deprecation: the file is what FID reads
        warnings.filterwarnings("ignore", message=".*torch.jit", category=FutureWarning)
        torch.jit.save(torch.jit.script(classifier.eval()), temporary)
    os.replace(temporary, path)


def train_classifier(config, path, epochs=3):
    """A StandInClassifier trained on the labels of config's training set (5,000 images held
    out), saved to `path` as save_extractor does. Returns its accuracy on the held-out images."""
    torch.manual_seed(0)
    dataset = reference_images(config)
    training, held_out = random_split(dataset, [len(dataset) - 5000, 5000])
    classifier = StandInClassifier(num_classes=len(dataset.classes))
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    for _ in range(epochs):
        for images, labels in DataLoader(training, batch_size=256, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(classifier(images)[1], labels).backward()
            optimizer.step()
    classifier.eval()
    with torch.no_grad():
        correct = sum((classifier(images)[1].argmax(1) == labels).sum().item()
                      for images, labels in DataLoader(held_out, batch_size=500))
    save_extractor(classifier, path)
    return correct / len(held_out)
