"""Editing given images (Diffusion/Editing.py, Diffusion/Run/Editing.py): RePaint and SDEdit
against independent computations, the named masks, and the states inpaint and sdedit run for
both models, reading back what they wrote."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import Main
import MainCondition
from conftest import REPO, as_arguments, run_script, write_images
from Diffusion.DDIM import DDIMSampler
from Diffusion.Diffusion import GaussianDiffusionSampler
from Diffusion.Latents import encode
from Diffusion.Editing import forward_jump, repaint, repaint_positions, sdedit
from Diffusion.Model import UNet
from Diffusion.Run.Config import ConfigError
from Diffusion.Run.Editing import named_mask
from DiffusionFreeGuidence import ModelCondition
from DiffusionFreeGuidence.DiffusionCondition import GaussianDiffusionSampler as GuidedSampler

T = 20


@pytest.fixture(scope="module")
def samplers():
    """Algorithm 2 with a tiny random UNet (T = 20, 8x8), clipping x_0; the guided one (w = 2) of a
    tiny conditional UNet; and DDIM (eta 1) respaced to 7 steps."""
    torch.manual_seed(0)
    model = UNet(T=T, ch=32, ch_mult=[1], attn=[], num_res_blocks=1, dropout=0.).eval()
    conditional = ModelCondition.UNet(T=T, num_labels=3, ch=32, ch_mult=[1], num_res_blocks=1, dropout=0.).eval()
    return {"ddpm": (GaussianDiffusionSampler(model, 1e-4, 0.2, T, clip_denoised=True), ()),
            "guided": (GuidedSampler(conditional, 1e-4, 0.2, T, w=2.), (torch.tensor([1, 3]),)),
            "respaced": (DDIMSampler(model, 1e-4, 0.2, T, timesteps=[0, 3, 6, 9, 12, 15, 18], eta=1.), ())}


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2. - 1.


def separate_noise(seed):
    generator = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=generator)


def test_repaint_visits_the_papers_jump_schedule():
    # 6 steps, jumps of 2 at positions 0 and 2, each taken resample - 1 = 2 times
    assert repaint_positions(6, 2, 3) == [5, 4, 3, 2, 3, 4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1, 0, -1]
    assert repaint_positions(4, 10, 10) == [3, 2, 1, 0, -1]  # no room for a jump
    assert repaint_positions(5, 3, 1) == [4, 3, 2, 1, 0, -1]  # resample 1: replacement


@pytest.mark.parametrize("name", ["ddpm", "guided", "respaced"])
def test_repaint_keeps_the_known_pixels_and_fills_the_rest(samplers, images, name):
    sampler, condition = samplers[name]
    x_T = torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    everything = repaint(sampler, images, torch.ones(2, 1, 8, 8), x_T, *condition, jump_length=2, resample=2)
    assert torch.equal(everything, images)  # the whole image known: the image
    mask = named_mask("center", 8)[None].expand(2, 1, 8, 8)
    filled = repaint(sampler, images, mask, x_T, *condition, jump_length=2, resample=3)
    known = mask.expand_as(images) == 1
    assert torch.equal(filled[known], images[known])
    assert (filled[~known] - images[~known]).abs().mean() > 0.1


@pytest.mark.parametrize("name", ["ddpm", "guided", "respaced"])
def test_repaint_with_nothing_known_and_no_resampling_is_sampling_from_the_same_noise(samplers, images, name):
    sampler, condition = samplers[name]
    x_T = torch.randn(images.shape, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(4)
    nothing_known = repaint(sampler, images, torch.zeros(2, 1, 8, 8), x_T, *condition, resample=1,
                            noise=separate_noise(5))
    torch.manual_seed(4)
    assert torch.equal(nothing_known, sampler(x_T, *condition, progress=False))


@pytest.mark.parametrize("timesteps", [None, [0, 4, 9, 13, 19]])
def test_a_forward_jump_draws_from_q_of_x_t_given_x_t_minus_1(timesteps):
    model = UNet(T=T, ch=32, ch_mult=[1], attn=[], num_res_blocks=1, dropout=0.)
    sampler = GaussianDiffusionSampler(model, 1e-4, 0.2, T, timesteps=timesteps)
    alphas_bar = np.cumprod(1. - np.linspace(1e-4, 0.2, T))
    visited = alphas_bar if timesteps is None else alphas_bar[timesteps]
    x_prev = torch.full((200_000,), 0.7)
    for position in (1, 3):
        beta = 1. - visited[position] / visited[position - 1]  # q(x_t | x_{t-1}) of the steps visited
        noise = torch.randn(x_prev.shape, generator=torch.Generator().manual_seed(6))
        x_t = forward_jump(sampler, x_prev, position, noise)
        assert x_t.mean().item() == pytest.approx(np.sqrt(1. - beta) * 0.7, abs=4e-3)
        assert x_t.var().item() == pytest.approx(beta, rel=2e-2)


@pytest.mark.parametrize("name", ["ddpm", "guided", "respaced"])
def test_sdedit_at_strength_1_is_sampling_and_at_0_the_image(samplers, images, name):
    sampler, condition = samplers[name]
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(8)
    edited, x_t0 = sdedit(sampler, images, 1., noise, *condition)
    torch.manual_seed(8)
    assert torch.equal(edited, sampler(noise, *condition, progress=False)) and torch.equal(x_t0, noise)
    assert torch.equal(sdedit(sampler, images, 0., noise, *condition)[0], images)


def test_sdedit_runs_the_reverse_process_from_q_of_x_t0_given_x_0(samplers, images):
    sampler, _ = samplers["ddpm"]
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(10)
    edited, x_t0 = sdedit(sampler, images, 0.3, noise)  # t0 = 6 of T = 20
    abar = np.cumprod(1. - np.linspace(1e-4, 0.2, T))[5]
    torch.testing.assert_close(x_t0, np.sqrt(abar) * images + np.sqrt(1. - abar) * noise)
    steps = []
    torch.manual_seed(10)
    again = sampler(encode(sampler, images, 6, noise), start=5, progress=False,
                    on_step=lambda x_t, x_0: steps.append(1))
    assert torch.equal(edited, again) and len(steps) == 6


def test_each_named_mask_covers_what_it_says():
    size, rows, columns = 16, torch.arange(16)[:, None], torch.arange(16)[None, :]
    covered = {"center": (rows >= 4) & (rows < 12) & (columns >= 4) & (columns < 12),
               "left": columns < 8, "right": columns >= 8, "top": rows < 8, "bottom": rows >= 8}
    for name, region in covered.items():
        assert torch.equal(named_mask(name, size)[0] == 0, region.expand(size, size)), name
    boxes = [named_mask("random_boxes", size, seed=3, index=index) for index in range(20)]
    assert torch.equal(boxes[0], named_mask("random_boxes", size, seed=3, index=0))  # the same image, the same boxes
    assert not torch.equal(boxes[0], boxes[1]) and not torch.equal(boxes[0], named_mask("random_boxes", size, seed=4))
    covered_share = torch.stack([(mask == 0).float().mean() for mask in boxes])
    assert (covered_share >= 4 / 256).all() and (covered_share <= 3 * 64 / 256).all()  # 3 boxes of 2 to 8 pixels a side


# --- the states, for both models ---------------------------------------------------------------


def edit_config(trained, tmp_path, state, images, **changes):
    return {**trained, "state": state, "test_load_weight": "ckpt_0_.pt", "sampled_dir": str(tmp_path / "edited"),
            "edit_images": str(images), "batch_size": 2, **changes}


def read_back(path):
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1.


def test_state_inpaint_keeps_the_left_halves_and_continues_an_interrupted_run(trained_unconditional, tmp_path):
    images = write_images(tmp_path / "inputs", 5, size=(8, 8), seed=11)
    config = edit_config(trained_unconditional, tmp_path, "inpaint", images, mask="right", jump_length=2, resample=2)
    Main.main(config)
    edited = tmp_path / "edited" / "inpaint"
    for index in range(5):
        given, result = read_back(images / f"{index}.png"), read_back(edited / "results" / f"{index:06d}.png")
        assert torch.equal(result[:, :, :4], given[:, :, :4])  # the kept half, to the last bit of the PNG
        assert (result[:, :, 4:] - given[:, :, 4:]).abs().mean() > 0.05
        masked = read_back(edited / "masked" / f"{index:06d}.png")
        assert torch.equal(masked[:, :, :4], given[:, :, :4])
        assert ((masked[:, :, 4:] - 0.5 / 127.5).abs() < 1e-6).all()  # the sampled half gray: 128
    with Image.open(edited / "side_by_side" / "000004.png") as row:
        assert row.size == (3 * 10 + 2, 10 + 2)  # input, masked, result
    with Image.open(tmp_path / "edited" / "inpaint.png") as overview:
        assert overview.size == (4 * 10 + 2, 3 * 10 + 2)  # the first nrow images: input, masked, result
    kept = (edited / "results" / "000003.png").read_bytes()
    (edited / "results" / "000003.png").unlink()
    Main.main(config)  # the batch of image 3 is drawn again, from the same seed
    assert (edited / "results" / "000003.png").read_bytes() == kept


def test_state_sdedit_of_the_guided_model_towards_a_class_in_bf16(trained_conditional, tmp_path):
    images = write_images(tmp_path / "inputs", 3, size=(12, 12), seed=12)  # fitted to 8x8 as in training
    config = edit_config(trained_conditional, tmp_path, "sdedit", images, strength=0.6, labels=[1], w=[0., 2.],
                         amp="bf16")
    MainCondition.main(config)
    edited = tmp_path / "edited" / "sdedit"
    assert sorted(path.name for path in edited.iterdir()) == ["noised", "side_by_side", "w0_class1", "w2_class1"]
    assert all(len(list((edited / name).glob("*.png"))) == 3 for name in ("noised", "w0_class1", "w2_class1"))
    assert read_back(edited / "w0_class1" / "000000.png").shape == (3, 8, 8)
    guided = [read_back(edited / f"w{w}_class1" / "000002.png") for w in (0, 2)]
    assert not torch.equal(*guided)  # w makes a difference
    summary = json.loads((tmp_path / "edited" / "sdedit.json").read_text())
    assert summary["t0"] == 6 and summary["network_evaluations"] == 6 and summary["images"] == 3  # 0.6 of T = 10
    with Image.open(edited / "side_by_side" / "000001.png") as row:
        assert row.size == (4 * 10 + 2, 10 + 2)  # input, noised, a result per w
    MainCondition.main({**config, "strength": 0., "sampled_dir": str(tmp_path / "unchanged")})
    unchanged = tmp_path / "unchanged" / "sdedit"
    for index in range(3):  # strength 0: the input, as the model sees it
        assert torch.equal(read_back(unchanged / "w2_class1" / f"{index:06d}.png"),
                           read_back(unchanged / "side_by_side" / f"{index:06d}.png")[:, 2:10, 2:10])


def test_bad_inputs_stop_before_any_work_with_one_sentence(trained_unconditional, tmp_path):
    images = write_images(tmp_path / "inputs", 2, size=(8, 8), seed=13)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image")
    Image.new("L", (10, 8), 255).save(tmp_path / "wide.png")
    gray = np.full((8, 8), 255, dtype=np.uint8)
    gray[2, 3] = 128
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    bad = [({"state": "inpaint", "mask": str(tmp_path / "wide.png")}, "mask .*wide.png' is 10x8 pixels but its image"),
           ({"state": "inpaint", "edit_images": str(tmp_path / "empty")},
            "edit_images .*empty' is a folder with no images"),
           ({"state": "inpaint", "mask": "centre"}, "mask 'centre' is neither a named mask"),
           ({"state": "sdedit", "strength": 1.5}, "strength must be between 0 .* not 1.5"),
           ({"state": "sdedit", "strength": 0.05, "sampler": "ddim", "sample_steps": 5}, "strength 0.05 starts SDEdit "
            ".* cannot start there: raise strength to 0.2"),
           ({"state": "inpaint", "sampler": "unipc"}, "sampler unipc cannot run RePaint")]
    for changes, message in bad:
        config = edit_config(trained_unconditional, tmp_path, changes.pop("state"), images, **changes)
        with pytest.raises(ConfigError, match=message):
            Main.main(config)
    assert not (tmp_path / "edited").exists()
    process = run_script("Main.py", *as_arguments(edit_config(trained_unconditional, tmp_path, "inpaint", images,
                                                              mask=str(tmp_path / "gray.png"))), cwd=tmp_path)
    assert process.returncode == 1 and "Traceback" not in process.stderr
    assert process.stderr.strip().splitlines()[-1].startswith("error: mask ")
    assert "is not black and white" in process.stderr
    assert "save it as a PNG of black (to sample) and white (to keep) only." in process.stderr
    assert not (tmp_path / "edited").exists()


def test_two_processes_edit_each_image_once_as_one_process_does(trained_unconditional, tmp_path):
    images = write_images(tmp_path / "inputs", 6, size=(8, 8), seed=14)
    config = edit_config(trained_unconditional, tmp_path, "inpaint", images, mask="random_boxes", resample=1)
    Main.main(config)
    config["sampled_dir"] = str(tmp_path / "two")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "Main.py"), *as_arguments(config)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "6 images edited now (4 + 2 by the 2 processes)" in run.stdout  # batches 0, 2 and 1 of 2 images
    for index in range(6):
        one, two = (tmp_path / folder / "inpaint" / "results" / f"{index:06d}.png" for folder in ("edited", "two"))
        assert one.read_bytes() == two.read_bytes()
