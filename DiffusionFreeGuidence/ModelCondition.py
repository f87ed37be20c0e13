"""The class-conditional eps_theta(x_t, t, c) of classifier-free guidance, as the original builds it.

It is Diffusion/Model.py's UNet body with these differences: a learned class embedding, added
by every ResBlock beside the (here trainable) time embedding; self-attention after every
down-path ResBlock and none on the up path; its own down- and upsamplers; PyTorch's default
initialisation. Label 0 is the null label (no class), 1..num_labels the classes.
"""
import torch
from torch import nn

from Diffusion import Model
from Diffusion.Model import AttnBlock, Swish, UNetBody, embedding_mlp  # noqa: F401 (the original's names)


def drop_connect(x, drop_ratio):
    """Each example of x [B, ...] zeroed with probability drop_ratio, the others scaled by
    1 / (1 - drop_ratio), in place (the original's; its UNet does not use it)."""
    keep_ratio = 1. - drop_ratio
    mask = torch.empty([x.shape[0]] + [1] * (x.dim() - 1), dtype=x.dtype, device=x.device)
    return x.div_(keep_ratio).mul_(mask.bernoulli_(keep_ratio))


class TimeEmbedding(Model.TimeEmbedding):
    """The time embedding of Diffusion/Model.py with a trainable table, as the original's."""

    def __init__(self, T, d_model, dim):
        super().__init__(T, d_model, dim, trainable=True)


class ResBlock(Model.ResBlock):
    """Diffusion/Model.py's ResBlock with the class embedding's projection beside the time one,
    self-attention by default, as the original's."""

    def __init__(self, in_ch, out_ch, tdim, dropout, attn=True):
        super().__init__(in_ch, out_ch, tdim, dropout, attn, cond_dim=tdim)


class ConditionalEmbedding(nn.Module):
    """labels [B] in 0..num_labels (0: null) -> [B, dim]: a learned table whose null row is
    zero (`padding_idx=0`), then Linear-Swish-Linear."""

    def __init__(self, num_labels, d_model, dim):
        super().__init__()
        table = nn.Embedding(num_labels + 1, d_model, padding_idx=0)
        self.condEmbedding = embedding_mlp(table, d_model, dim)

    def forward(self, labels):
        return self.condEmbedding(labels)


class DownSample(nn.Module):
    """The sum of a 3x3 and a 5x5 stride-2 conv: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, in_ch):
        super().__init__()
        self.c1 = nn.Conv2d(in_ch, in_ch, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(in_ch, in_ch, 5, stride=2, padding=2)

    def forward(self, x, *embeddings):
        return self.c1(x) + self.c2(x)


class UpSample(nn.Module):
    """A 5x5 stride-2 transposed conv, then a 3x3 conv: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, in_ch):
        super().__init__()
        self.c = nn.Conv2d(in_ch, in_ch, 3, padding=1)
        self.t = nn.ConvTranspose2d(in_ch, in_ch, 5, stride=2, padding=2, output_padding=1)

    def forward(self, x, *embeddings):
        return self.c(self.t(x))


class UNet(UNetBody):
    """eps_theta(x_t, t, c): x_t [B, 3, H, W], t [B] in 0..T-1, labels [B] in 0..num_labels
    (0: null) -> eps [B, 3, H, W] (1 channel instead of 3 with img_channels 1; out_channels 2
    img_channels for a learned variance)."""

    def __init__(self, T, num_labels, ch, ch_mult, num_res_blocks, dropout, img_channels=3, out_channels=None):
        super().__init__()
        tdim = 4 * ch
        self.time_embedding = TimeEmbedding(T, ch, tdim)
        self.cond_embedding = ConditionalEmbedding(num_labels, ch, tdim)
        self.build_body(
            ch, ch_mult, num_res_blocks,
            res_block=lambda in_ch, out_ch, with_attn: ResBlock(in_ch, out_ch, tdim, dropout, with_attn),
            downsample=DownSample, upsample=UpSample,
            attn_down=range(len(ch_mult)), attn_up=(), img_channels=img_channels, out_channels=out_channels)

    def forward(self, x, t, labels):
        return self.run_body(x, self.time_embedding(t), self.cond_embedding(labels))
