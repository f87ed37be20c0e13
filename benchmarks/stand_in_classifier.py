"""The benchmarks' stand-in for the Inception network of FID, where Inception is too slow (a CPU)
or its numbers are not needed: a small CNN classifier trained on the dataset's labels, saved as
a TorchScript file that `--fid_extractor` takes (docs/fid.md). Its FID is not the papers'
Inception FID: compare its numbers only with each other, within one table.

    python benchmarks/sampling.py --speed none --fid_dir RUN ...   # trains RUN/classifier.pt if missing
    python benchmarks/stand_in_classifier.py --dataset digits/train --img_size 16 --out classifier.pt
"""
import argparse
import os
import sys
import warnings

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, random_split

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from Diffusion.Run.Data import dataset_of, image_transform  # noqa: E402


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
    """A StandInClassifier trained on the labels of config's training set (a torchvision dataset or
    a folder with a subfolder per class; a fifth, at most 5,000 images, held out), saved to `path`
    as save_extractor does. Returns its accuracy on the held-out images."""
    torch.manual_seed(0)
    dataset = dataset_of(config["dataset"], config["data_root"], image_transform(config["img_size"], for_model=False),
                         labelled=True)
    held_out_count = min(5000, len(dataset) // 5)
    training, held_out = random_split(dataset, [len(dataset) - held_out_count, held_out_count])
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a torchvision dataset or a folder with a subfolder per class")
    parser.add_argument("--data_root", default=".")
    parser.add_argument("--img_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="classifier.pt")
    arguments = parser.parse_args()
    accuracy = train_classifier(vars(arguments), arguments.out, arguments.epochs)
    print(f"wrote {arguments.out}: {accuracy:.1%} of the held-out images classified right")
