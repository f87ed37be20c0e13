"""The UNets eps_theta: the original's checkpoint layout, its numbers, attention, initialisation."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from Diffusion.Model import AttnBlock, ResBlock, UNet, attention, sinusoidal_table
from DiffusionFreeGuidence import ModelCondition


def build(kind, config):
    """The UNet of layouts.json / golden_small.pt's `config` (the original's argument names)."""
    config = {"dropout": 0.1, **config}
    return UNet(**config) if kind == "unconditional" else ModelCondition.UNet(**config)


def layout_of(model):
    return [[key, list(value.shape), str(value.dtype).removeprefix("torch.")]
            for key, value in model.state_dict().items()]


def relative_error(got, expected):
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("kind", ["unconditional", "conditional"])
def test_default_unet_has_the_original_state_dict_layout_and_parameter_count(kind, layouts):
    layout = layouts[kind]
    model = build(kind, layout["config"])
    assert layout_of(model) == layout["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == layout["params"]


@pytest.mark.parametrize("kind", ["unconditional", "conditional"])
def test_original_checkpoint_of_the_layout_loads_with_strict_true(kind, layouts):
    layout = layouts[kind]
    generator = torch.Generator().manual_seed(0)
    checkpoint = {key: torch.randn(shape, generator=generator).to(getattr(torch, dtype))
                  for key, shape, dtype in layout["state_dict"]}
    model = build(kind, layout["config"])
    model.load_state_dict(checkpoint, strict=True)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in checkpoint.items())


@pytest.mark.parametrize("kind", ["unconditional", "conditional"])
def test_unet_reproduces_the_original_outputs_on_golden_weights(kind, golden):
    case = golden[kind]
    model = build(kind, case["config"])
    model.load_state_dict(case["state_dict"], strict=True)
    model.eval()
    inputs = (case["x"], case["t"]) + ((case["labels"],) if kind == "conditional" else ())
    with torch.no_grad():
        out = model(*inputs)
    assert out.shape == case["out"].shape
    assert relative_error(out, case["out"]) < 1e-5


def test_attention_equals_softmax_of_scaled_query_key_products_times_values():
    torch.manual_seed(0)
    block = AttnBlock(64)
    for parameter in block.parameters():  # the init makes proj ~1e-5: nothing would be tested
        nn.init.normal_(parameter, std=0.3)
    x = torch.randn(2, 64, 6, 5)

    B, C, H, W = x.shape
    h = block.group_norm(x)
    q = block.proj_q(h).reshape(B, C, H * W).permute(0, 2, 1)  # [B, HW, C]
    k = block.proj_k(h).reshape(B, C, H * W)                    # [B, C, HW]
    v = block.proj_v(h).reshape(B, C, H * W).permute(0, 2, 1)  # [B, HW, C]
    weights = torch.softmax(torch.bmm(q, k) / math.sqrt(C), dim=-1)
    attended = torch.bmm(weights, v).permute(0, 2, 1).reshape(B, C, H, W)
    expected = x + block.proj(attended)

    with torch.no_grad():
        got = block(x)
    assert relative_error(got - x, expected - x) < 1e-5


def xavier_bound(layer, gain=1.):
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
    return gain * math.sqrt(6. / (fan_in + fan_out))


def test_unconditional_init_is_xavier_with_zero_biases_and_near_zero_residual_branches():
    torch.manual_seed(0)
    model = UNet(T=20, ch=32, ch_mult=[1, 2], attn=[1], num_res_blocks=1, dropout=0.1)
    near_zero = [m.block2[-1] for m in model.modules() if isinstance(m, ResBlock)]
    near_zero += [m.proj for m in model.modules() if isinstance(m, AttnBlock)]
    near_zero.append(model.tail[-1])
    resblocks = sum(isinstance(m, ResBlock) for m in model.modules())
    attnblocks = sum(isinstance(m, AttnBlock) for m in model.modules())
    assert attnblocks > 0 and len(near_zero) == resblocks + attnblocks + 1

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers:
        assert torch.count_nonzero(layer.bias) == 0
        largest = layer.weight.abs().max().item()
        if any(layer is small for small in near_zero):
            assert 0 < largest < 1e-4
            assert largest <= xavier_bound(layer, gain=1e-5)
        else:  # uniform on [-bound, bound]: hundreds of draws come close to the bound
            assert 0.9 * xavier_bound(layer) < largest <= xavier_bound(layer)


def test_time_embedding_table_is_frozen_unconditional_and_trainable_conditional():
    unconditional = UNet(T=20, ch=32, ch_mult=[1, 2], attn=[1], num_res_blocks=1, dropout=0.)
    conditional = ModelCondition.UNet(T=20, num_labels=3, ch=32, ch_mult=[1, 2],
                                      num_res_blocks=1, dropout=0.)
    assert unconditional.time_embedding.timembedding[0].weight.requires_grad is False
    assert conditional.time_embedding.timembedding[0].weight.requires_grad is True
    for model in (unconditional, conditional):
        table = model.time_embedding.timembedding[0].weight
        assert torch.equal(table, sinusoidal_table(20, 32))


def test_sinusoidal_table_interleaves_sin_and_cos_of_geometric_frequencies():
    T, d_model = 1000, 128
    table = sinusoidal_table(T, d_model)
    t = torch.arange(T, dtype=torch.float64)[:, None]
    frequencies = 10000. ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    assert table.shape == (T, d_model)
    assert torch.allclose(table[:, 0::2].double(), torch.sin(t * frequencies), atol=1e-4)
    assert torch.allclose(table[:, 1::2].double(), torch.cos(t * frequencies), atol=1e-4)


def test_null_label_embeds_to_zero_and_classes_to_learned_rows():
    model = ModelCondition.UNet(T=20, num_labels=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, dropout=0.)
    table = model.cond_embedding.condEmbedding[0]
    assert table.weight.shape == (4, 32)
    assert torch.count_nonzero(table(torch.tensor([0]))) == 0
    assert torch.count_nonzero(table(torch.tensor([1, 2, 3]))) > 0


@pytest.mark.parametrize("padding", ["symmetric", "same"])
@pytest.mark.parametrize("size", [16, 12])
def test_unet_maps_images_to_noise_of_the_same_shape(padding, size):
    model = UNet(T=20, ch=32, ch_mult=[1, 2, 2], attn=[1], num_res_blocks=1, dropout=0.,
                 downsample_padding=padding).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert model(x, torch.tensor([0, 19])).shape == x.shape


def test_unet_rejects_attention_at_a_level_it_does_not_have():
    with pytest.raises(ValueError, match="attn"):
        UNet(T=20, ch=32, ch_mult=[1, 2], attn=[2], num_res_blocks=1, dropout=0.)


def test_same_padding_downsample_pads_after_only_as_tensorflow():
    from Diffusion.Model import DownSample
    symmetric, same = DownSample(4, "symmetric"), DownSample(4, "same")
    same.main.load_state_dict(symmetric.main.state_dict())
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), same.main.weight, same.main.bias, stride=2)
        assert torch.allclose(same(x), expected, atol=1e-6)
        assert not torch.allclose(symmetric(x), expected, atol=1e-3)


def test_attention_on_a_cpu_computes_what_scaled_dot_product_attention_does():
    """The CPU path (matmul-softmax-matmul) and the GPU path (the fused kernel) agree."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 1, 64, 32) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(attention(q, k, v), expected, rtol=1e-5, atol=1e-6)
