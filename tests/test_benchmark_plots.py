"""The benchmarks' figures, drawn by matplotlib: the recipes' FID against training time
(benchmarks/recipes.py) and the sheet of each sampler's first samples (benchmarks/sampling.py)."""
import matplotlib  # noqa: F401 (requirements-test.txt installs it: a missing one fails here, never skips)
from PIL import Image

from benchmarks.recipes import plot
from benchmarks.sampling import picture


def test_the_recipes_plot_is_a_760x480_png(tmp_path):
    results = {"original": [(8., [4.51, 5.00]), (15., [2.85, 3.34]), (53., [1.46, 1.73])],
               "v + min-SNR": [(8., [1.62, 2.10]), (15., [1.43, 1.68]), (53., [1.03, 1.42])]}
    plot(results, tmp_path / "recipes.png", "FID (stand-in features, 1000 images) against training time")
    with Image.open(tmp_path / "recipes.png") as image:
        assert (image.format, image.size) == ("PNG", (760, 480))


def test_the_samplers_picture_shows_a_row_per_sampler(tmp_path, capsys):
    names = ["DDPM-1000", "DPM-Solver++-20 eta 10 from SNR 0.1"]
    for row, name in enumerate(names):
        folder = tmp_path / "run" / "samples" / name.replace(" ", "_") / "seed0"
        folder.mkdir(parents=True)
        for index in range(4):
            Image.new("L", (16, 16), 60 * row + 40 * index).save(folder / f"{index:06d}.png")
    picture(tmp_path / "run", names, tmp_path / "samplers.png", count=4, scale=4)
    with Image.open(tmp_path / "samplers.png") as image:
        assert image.format == "PNG"
        assert image.height >= 2 * 16 * 4 and image.width > 4 * 16 * 4  # the images at 4x, the labels beside
    assert f"wrote {tmp_path / 'samplers.png'}" in capsys.readouterr().out
