"""The noise-prediction network eps_theta(x_t, t) of DDPM (Ho et al. 2020, Appendix B).

A UNet in the style of PixelCNN++: at every resolution `num_res_blocks` residual blocks that
see the timestep embedding, self-attention at the resolutions listed in `attn`, and a skip
connection from every down-path output to the up path. Module names follow the original
research code, so its checkpoints load with `strict=True`.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn import init

DOWNSAMPLE_PADDINGS = ("symmetric", "same")


class Swish(nn.Module):
    """x sigmoid(x) (Ramachandran et al. 2017), the activation of every block."""

    def forward(self, x):
        return F.silu(x)


def xavier(layer, gain=1.):
    """Xavier-uniform weights of a conv or linear layer (scaled by `gain`), zero biases."""
    init.xavier_uniform_(layer.weight, gain=gain)
    init.zeros_(layer.bias)


def sinusoidal_table(T, d_model):
    """The Transformer's position embedding (Vaswani et al. 2017, Sec. 3.5) of t = 0..T-1.

    Row t holds sin(t w_0), cos(t w_0), sin(t w_1), cos(t w_1), ... (interleaved, as the
    original) with w_i = 10000^(-2i / d_model). Returns [T, d_model].
    """
    frequencies = torch.exp(-(torch.arange(0, d_model, 2) / d_model * math.log(10000)))
    angles = torch.arange(T).float()[:, None] * frequencies[None, :]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).view(T, d_model)


def embedding_projection(emb_dim, out_ch):
    """Swish then Linear: an embedding [B, emb_dim] -> a per-channel bias [B, out_ch]."""
    return nn.Sequential(Swish(), nn.Linear(emb_dim, out_ch))


def embedding_mlp(table, d_model, dim):
    """An embedding table of width d_model, then Linear-Swish-Linear to `dim`."""
    return nn.Sequential(table, nn.Linear(d_model, dim), Swish(), nn.Linear(dim, dim))


class TimeEmbedding(nn.Module):
    """t [B] (0-based) -> [B, dim]: a table of sinusoids, then Linear-Swish-Linear.

    The table is an `nn.Embedding`, frozen unless `trainable`, so it is part of the checkpoint:
    a model trained with another table (e.g. the official DDPM model's) brings its own.
    """

    def __init__(self, T, d_model, dim, trainable=False):
        super().__init__()
        table = nn.Embedding.from_pretrained(sinusoidal_table(T, d_model), freeze=not trainable)
        self.timembedding = embedding_mlp(table, d_model, dim)

    def initialize(self):
        xavier(self.timembedding[1])
        xavier(self.timembedding[3])

    def forward(self, t):
        return self.timembedding(t)


class DownSample(nn.Module):
    """Stride-2 3x3 conv: [B, C, H, W] -> [B, C, H/2, W/2].

    padding "symmetric" pads one row and column on each side (the original); "same" pads one
    after only, as TensorFlow's SAME padding that the official DDPM model was trained with.
    """

    def __init__(self, in_ch, padding="symmetric"):
        super().__init__()
        self.pad_after_only = padding == "same"
        self.main = nn.Conv2d(in_ch, in_ch, 3, stride=2, padding=0 if self.pad_after_only else 1)

    def initialize(self):
        xavier(self.main)

    def forward(self, x, *embeddings):
        if self.pad_after_only:
            x = F.pad(x, (0, 1, 0, 1))
        return self.main(x)


class UpSample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, in_ch):
        super().__init__()
        self.main = nn.Conv2d(in_ch, in_ch, 3, padding=1)

    def initialize(self):
        xavier(self.main)

    def forward(self, x, *embeddings):
        return self.main(F.interpolate(x, scale_factor=2, mode="nearest"))


def attention(q, k, v):
    """softmax(q k^T / sqrt(C)) v for q, k, v [B, heads, N, C]: PyTorch's fused
    scaled_dot_product_attention on a GPU; on a CPU the plain matmul-softmax-matmul, which is as
    fast or faster there (benchmarks/RESULTS.md)."""
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection.

    x + proj(softmax(q k^T / sqrt(C)) v), where q, k, v are 1x1 convs of GroupNorm(x).
    [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, in_ch, eps=1e-5):
        super().__init__()
        self.group_norm = nn.GroupNorm(32, in_ch, eps=eps)
        self.proj_q = nn.Conv2d(in_ch, in_ch, 1)
        self.proj_k = nn.Conv2d(in_ch, in_ch, 1)
        self.proj_v = nn.Conv2d(in_ch, in_ch, 1)
        self.proj = nn.Conv2d(in_ch, in_ch, 1)

    def initialize(self):
        """The output projection starts near zero (gain 1e-5): the block starts as the identity."""
        for projection in (self.proj_q, self.proj_k, self.proj_v):
            xavier(projection)
        xavier(self.proj, gain=1e-5)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x)
        q, k, v = (p(h).view(B, 1, C, H * W).transpose(2, 3) for p in (self.proj_q, self.proj_k, self.proj_v))
        h = attention(q, k, v)  # [B, 1, H*W, C]
        h = h.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj(h)


class ResBlock(nn.Module):
    """The residual block: [B, in_ch, H, W] -> [B, out_ch, H, W].

    h = block1(x) + temb_proj(temb); out = block2(h) + shortcut(x), then self-attention if
    `attn`. With `cond_dim` (the class-conditional model) a projection of the class embedding,
    `cond_proj`, is added beside the time one.
    """

    def __init__(self, in_ch, out_ch, tdim, dropout, attn=False, eps=1e-5, cond_dim=None):
        super().__init__()
        self.block1 = nn.Sequential(
            nn.GroupNorm(32, in_ch, eps=eps),
            Swish(),
            nn.Conv2d(in_ch, out_ch, 3, padding=1),
        )
        self.temb_proj = embedding_projection(tdim, out_ch)
        if cond_dim is not None:
            self.cond_proj = embedding_projection(cond_dim, out_ch)
        self.block2 = nn.Sequential(
            nn.GroupNorm(32, out_ch, eps=eps),
            Swish(),
            nn.Dropout(dropout),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
        )
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = AttnBlock(out_ch, eps) if attn else nn.Identity()

    def initialize(self):
        """The residual branch starts near zero (gain 1e-5 on its last conv); the attention
        initialises itself."""
        attention = set(self.attn.modules())
        for layer in self.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)) and layer not in attention:
                xavier(layer)
        xavier(self.block2[-1], gain=1e-5)

    def forward(self, x, temb, cemb=None):
        h = self.block1(x) + self.temb_proj(temb)[:, :, None, None]
        if cemb is not None:
            h = h + self.cond_proj(cemb)[:, :, None, None]
        h = self.block2(h) + self.shortcut(x)
        return self.attn(h)


class UNetBody(nn.Module):
    """What this repo's two UNets share: head conv, down path, middle, up path, tail.

    Subclasses build their embeddings, then call `build_body` with their own blocks, and run
    `run_body(x, *embeddings)` in `forward`.
    """

    def build_body(self, ch, ch_mult, num_res_blocks, res_block, downsample, upsample,
                   attn_down, attn_up, eps=1e-5, img_channels=3, out_channels=None):
        """res_block(in_ch, out_ch, attn) -> ResBlock; downsample(ch), upsample(ch) -> resamplers;
        attn_down, attn_up: the levels (indices into ch_mult) whose ResBlocks end in attention;
        img_channels: of the images (3: RGB, 1: grayscale); out_channels: of the output (None:
        img_channels; twice as many for a learned variance)."""
        self.head = nn.Conv2d(img_channels, ch, 3, padding=1)
        self.downblocks = nn.ModuleList()
        skip_chs = [ch]
        now_ch = ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.downblocks.append(res_block(now_ch, ch * mult, level in attn_down))
                now_ch = ch * mult
                skip_chs.append(now_ch)
            if level != len(ch_mult) - 1:
                self.downblocks.append(downsample(now_ch))
                skip_chs.append(now_ch)

        self.middleblocks = nn.ModuleList([
            res_block(now_ch, now_ch, True),
            res_block(now_ch, now_ch, False),
        ])

        self.upblocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.upblocks.append(res_block(skip_chs.pop() + now_ch, ch * mult, level in attn_up))
                now_ch = ch * mult
            if level != 0:
                self.upblocks.append(upsample(now_ch))

        self.tail = nn.Sequential(
            nn.GroupNorm(32, now_ch, eps=eps),
            Swish(),
            nn.Conv2d(now_ch, out_channels or img_channels, 3, padding=1),
        )

    def run_body(self, x, *embeddings):
        """x [B, img_channels, H, W] and the embeddings ([B, tdim] each) -> [B, out_channels, H, W]."""
        h = self.head(x)
        # Every down-path output (head included) is kept; each up-path ResBlock takes the
        # latest one back, concatenated to its input: the first down output pairs with the last
        # up ResBlock, as in a mirror.
        skips = [h]
        for layer in self.downblocks:
            h = layer(h, *embeddings)
            skips.append(h)
        for layer in self.middleblocks:
            h = layer(h, *embeddings)
        for layer in self.upblocks:
            if isinstance(layer, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = layer(h, *embeddings)
        return self.tail(h)


def check_attention_levels(attn, ch_mult):
    """Raise ValueError, naming the config keys, unless every level in attn is one of ch_mult's."""
    outside = [level for level in attn if not 0 <= level < len(ch_mult)]
    if outside:
        raise ValueError(f"attn {list(attn)} names level {outside[0]}, but channel_mult {list(ch_mult)} "
                         f"has levels 0..{len(ch_mult) - 1}: use indices in that range.")


class UNet(UNetBody):
    """eps_theta(x_t, t): x_t [B, 3, H, W] in [-1, 1], t [B] in 0..T-1 -> eps [B, 3, H, W]
    (1 channel instead of 3 with img_channels 1, for grayscale images; out_channels 2 img_channels
    for a learned variance: eps, then the variance's channels).

    ch: base channels (a multiple of 32, for GroupNorm); ch_mult: channels of each resolution
    level as multiples of ch, each level after the first halving H and W; attn: the levels with
    self-attention; group_norm_eps, downsample_padding: 1e-5 and "symmetric" as the original,
    1e-6 and "same" for the official DDPM model.
    """

    def __init__(self, T, ch, ch_mult, attn, num_res_blocks, dropout,
                 group_norm_eps=1e-5, downsample_padding="symmetric", img_channels=3, out_channels=None):
        super().__init__()
        check_attention_levels(attn, ch_mult)
        tdim = 4 * ch
        self.time_embedding = TimeEmbedding(T, ch, tdim)
        self.build_body(
            ch, ch_mult, num_res_blocks,
            res_block=lambda in_ch, out_ch, with_attn: ResBlock(
                in_ch, out_ch, tdim, dropout, with_attn, group_norm_eps),
            downsample=lambda c: DownSample(c, downsample_padding),
            upsample=UpSample,
            attn_down=attn, attn_up=attn, eps=group_norm_eps, img_channels=img_channels,
            out_channels=out_channels)
        self.initialize()

    def initialize(self):
        """Xavier-uniform weights and zero biases; every residual branch (each ResBlock's last
        conv, each attention output projection) and the tail start near zero (gain 1e-5)."""
        xavier(self.head)
        xavier(self.tail[-1], gain=1e-5)
        for block in self.modules():
            if block is not self and hasattr(block, "initialize"):
                block.initialize()

    def forward(self, x, t):
        return self.run_body(x, self.time_embedding(t))
