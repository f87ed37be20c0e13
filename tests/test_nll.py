"""State nll (Diffusion/Run/Evaluation.py): bits/dim of held-out images with their parts, from a
folder or a dataset's test split, for both models, on one process or two."""
import re
import subprocess
import sys

import pytest

from conftest import REPO, as_arguments, run_or_fail, run_script, write_images, write_mnist_files

LINE = re.compile(r"NLL <= (\d+\.\d+) ± (\d+\.\d+) bits/dim .* over (\d+) held-out images, fixedlarge variance\): "
                  r"prior L_T (\d+\.\d+), KL terms (\d+\.\d+), decoder L_0 (\d+\.\d+)")


def bounds(output):
    """[(total, error, images, prior, KL terms, decoder)] of each NLL line, and its prefix."""
    return [(line.split("NLL")[0], *map(float, LINE.search(line).groups()))
            for line in output.splitlines() if "NLL <=" in line]


def nll_config(trained, tmp_path, **changes):
    return {**trained, "state": "nll", "test_load_weight": "ckpt_0_.pt", "batch_size": 2, **changes}


def test_state_nll_prints_bits_per_dim_with_its_parts(trained_unconditional, tmp_path):
    held_out = write_images(tmp_path / "held_out", 3, size=(8, 8), seed=7)
    process = run_or_fail("Main.py", *as_arguments(nll_config(trained_unconditional, tmp_path, nll_dataset=held_out,
                                                              nll_images=2)), cwd=tmp_path)
    ((prefix, total, error, images, prior, kl, decoder),) = bounds(process.stdout)
    assert prefix == "" and images == 2  # nll_images of the 3
    assert total == pytest.approx(prior + kl + decoder, abs=2e-3) and error > 0
    assert 0 < total < 20 and "nll" in process.stderr  # the progress bar


def test_state_nll_scores_the_test_split_of_a_torchvision_dataset(trained_unconditional, tmp_path):
    data_root = write_mnist_files(tmp_path / "data")
    process = run_or_fail("Main.py", *as_arguments(nll_config(trained_unconditional, tmp_path, dataset="MNIST",
                                                              data_root=data_root)), cwd=tmp_path)
    assert [images for _, _, _, images, *_ in bounds(process.stdout)] == [2]  # MNIST's t10k files: 2


def test_two_processes_score_the_images_one_process_scores(trained_unconditional, tmp_path):
    held_out = write_images(tmp_path / "held_out", 4, size=(8, 8), seed=8)
    arguments = as_arguments(nll_config(trained_unconditional, tmp_path, nll_dataset=held_out, batch_size=1))
    one = run_or_fail("Main.py", *arguments, cwd=tmp_path)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "Main.py"), *arguments], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert two.returncode == 0, two.stderr[-2000:]
    assert bounds(two.stdout) == bounds(one.stdout)  # printed once, the same numbers


def test_the_conditional_model_scores_each_guidance_weight_with_the_images_classes(trained_conditional, tmp_path):
    for seed, name in enumerate(["airplane", "bird", "cat"]):
        write_images(tmp_path / "held_out" / name, 1, size=(8, 8), seed=seed + 10)
    config = nll_config(trained_conditional, tmp_path, nll_dataset=tmp_path / "held_out", w=[0., 2.])
    process = run_or_fail("MainCondition.py", *as_arguments(config), cwd=tmp_path)
    assert [prefix for prefix, *_ in bounds(process.stdout)] == ["w = 0: ", "w = 2: "]


def test_a_folder_dataset_without_held_out_images_is_refused(trained_unconditional, tmp_path):
    process = run_script("Main.py", *as_arguments(nll_config(trained_unconditional, tmp_path)), cwd=tmp_path)
    assert process.returncode == 1 and "Traceback" not in process.stderr
    assert "nll_dataset" in process.stderr and "test split" in process.stderr
