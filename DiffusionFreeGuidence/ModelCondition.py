"""The class-conditional eps_theta(x_t, t, c) of classifier-free guidance, as the original builds it.

It is Diffusion/Model.py's UNet body with these differences: a learned class embedding, added
by every ResBlock beside the (here trainable) time embedding; self-attention after every
down-path ResBlock and none on the up path; its own down- and upsamplers; PyTorch's default
initialisation. Label 0 is the null label (no class), 1..num_labels the classes.
"""
from torch import nn

from Diffusion.Model import ResBlock, TimeEmbedding, UNetBody, embedding_mlp


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
    (0: null) -> eps [B, 3, H, W] (1 channel instead of 3 with img_channels 1)."""

    def __init__(self, T, num_labels, ch, ch_mult, num_res_blocks, dropout, img_channels=3):
        super().__init__()
        tdim = 4 * ch
        self.time_embedding = TimeEmbedding(T, ch, tdim, trainable=True)
        self.cond_embedding = ConditionalEmbedding(num_labels, ch, tdim)
        self.build_body(
            ch, ch_mult, num_res_blocks,
            res_block=lambda in_ch, out_ch, with_attn: ResBlock(
                in_ch, out_ch, tdim, dropout, with_attn, cond_dim=tdim),
            downsample=DownSample, upsample=UpSample,
            attn_down=range(len(ch_mult)), attn_up=(), img_channels=img_channels)

    def forward(self, x, t, labels):
        return self.run_body(x, self.time_embedding(t), self.cond_embedding(labels))
