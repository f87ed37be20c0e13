"""The config of Main.py and MainCondition.py: command-line overrides, checks, error messages."""
import json
import os
from pathlib import Path

import pytest
import torch

import Main
import MainCondition
from conftest import REPO, as_arguments, defaults_of, parsed, run_script
from Diffusion.Run.Checkpoints import unet_config_of
from Diffusion.Run.Config import ConfigError
from Diffusion.Train import UNCONDITIONAL
from DiffusionFreeGuidence.TrainCondition import CONDITIONAL

VARIANTS = {Main: UNCONDITIONAL, MainCondition: CONDITIONAL}


def command_line_error(argv, capsys, script="Main"):
    """The message a command line is refused with (argparse exits with status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        parsed(argv, script)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_command_line_overrides_become_python_values():
    config = parsed(["--epoch", "1", "--channel_mult", "1,2,2", "--lr=2e-4", "--multiplier", "3",
                     "--attn", "[0,2]", "--device", "cpu"])
    assert config["epoch"] == 1 and type(config["epoch"]) is int
    assert config["channel_mult"] == [1, 2, 2]
    assert config["attn"] == [0, 2]
    assert config["lr"] == 2e-4
    assert config["multiplier"] == 3. and type(config["multiplier"]) is float
    untouched = {key: value for key, value in defaults_of("Main").items()
                 if key not in ("epoch", "channel_mult", "lr", "multiplier", "attn", "device")}
    assert {key: config[key] for key in untouched} == untouched


def test_key_equals_value_form_is_accepted():
    assert parsed(["--epoch=1", "--state=eval"])["epoch"] == 1
    assert parsed(["--epoch=1", "--state=eval"])["state"] == "eval"


@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("1", True), ("yes", True),
                                         ("false", False), ("False", False), ("0", False), ("no", False)])
def test_booleans_parse_from_the_usual_words(text, value):
    assert parsed(["--clip_denoised", text])["clip_denoised"] is value


def test_none_is_parsed_for_optional_keys():
    assert parsed(["--training_load_weight", "None"])["training_load_weight"] is None
    assert parsed(["--training_load_weight", "last"])["training_load_weight"] == "last"
    assert parsed(["--training_load_weight", "ckpt_3_.pt"])["training_load_weight"] == "ckpt_3_.pt"
    assert parsed(["--seed", "none"])["seed"] is None
    assert parsed(["--seed", "7"])["seed"] == 7


def test_guidance_weight_is_a_number_or_a_list_and_labels_a_list():
    assert parsed(["--w", "3"], "MainCondition")["w"] == 3.
    assert parsed(["--w", "0,1.8,4"], "MainCondition")["w"] == [0., 1.8, 4.]
    assert parsed(["--labels", "0,2"], "MainCondition")["labels"] == [0, 2]
    assert parsed(["--labels", "None"], "MainCondition")["labels"] is None


def test_wrong_type_on_the_command_line_names_the_key(capsys):
    message = command_line_error(["--epoch", "x"], capsys)
    assert "--epoch" in message and "'x'" in message and "integer" in message
    message = command_line_error(["--clip_denoised", "maybe"], capsys)
    assert "--clip_denoised" in message and "'maybe'" in message


@pytest.mark.parametrize("argv, closest", [(["--epochs", "3"], "epoch"), (["--chanel=64"], "channel"),
                                           (["--batchsize", "4"], "batch_size")])
def test_unknown_key_on_the_command_line_names_it_and_the_closest_key(argv, closest, capsys):
    message = command_line_error(argv, capsys)
    assert argv[0].split("=")[0] in message
    assert f"'{closest}'" in message


def test_unknown_key_of_the_other_script_is_refused(capsys):
    message = command_line_error(["--w", "2"], capsys)  # guidance is MainCondition.py's
    assert "'--w'" in message


@pytest.mark.parametrize("script", [Main, MainCondition], ids=["Main", "MainCondition"])
def test_help_lists_every_key_with_its_default(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parsed(["--help"], script.__name__)
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    unwrapped = text.replace(" ", "")  # argparse also breaks lines after hyphens
    for key, value in defaults_of(script.__name__).items():
        assert f"--{key} " in text
        assert f"{VARIANTS[script].keys[key].meaning} (default: {value!r})".replace(" ", "") in unwrapped, key


def test_config_file_applies_and_command_line_keys_override_it(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"epoch": 5, "batch_size": 4, "channel_mult": [1, 2], "attn": [1]}))
    config = parsed(["--config", str(path), "--epoch", "3"])
    assert config["epoch"] == 3
    assert config["batch_size"] == 4
    assert config["channel_mult"] == [1, 2]
    assert config["T"] == Main.modelConfig["T"]


def test_config_file_with_an_unknown_key_is_refused(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"epohc": 5}))
    message = command_line_error(["--config", str(path)], capsys)
    assert "'epohc'" in message and "'epoch'" in message


def test_missing_config_file_is_refused(tmp_path, capsys):
    message = command_line_error(["--config", str(tmp_path / "nothing.json")], capsys)
    assert "nothing.json" in message


def refused_by_main(tiny_config, **changes):
    """The ConfigError Main.main raises for tiny_config with `changes`; checks it did no work."""
    with pytest.raises(ConfigError) as error:
        Main.main({**tiny_config, **changes})
    for folder in ("save_weight_dir", "sampled_dir"):
        assert not os.path.exists(tiny_config[folder])
    return str(error.value)


def test_unknown_key_in_the_dict_names_it_and_the_closest_key(tiny_config):
    message = refused_by_main(tiny_config, epochs=1)
    assert "'epochs'" in message and "'epoch'" in message


@pytest.mark.parametrize("key, value", [("epoch", 3.5), ("epoch", "1"), ("epoch", True),
                                        ("channel_mult", "1,2"), ("lr", "1e-4"), ("state", "test")])
def test_wrong_type_in_the_dict_names_the_key(tiny_config, key, value):
    message = refused_by_main(tiny_config, **{key: value})
    assert f"'{key}'" in message and repr(value) in message


def test_attention_level_out_of_range_is_refused(tiny_config):
    message = refused_by_main(tiny_config, channel_mult=[1, 2], attn=[2])
    assert "attn" in message and "0..1" in message


def test_channel_not_divisible_by_32_is_refused(tiny_config):
    message = refused_by_main(tiny_config, channel=48)
    assert "channel" in message and "32" in message and "48" in message


def test_image_size_the_unet_cannot_halve_is_refused(tiny_config):
    message = refused_by_main(tiny_config, img_size=18, channel_mult=[1, 2, 2], attn=[1])
    assert "img_size" in message and "18" in message


@pytest.mark.parametrize("changes, key", [({"batch_size": 0}, "batch_size"), ({"beta_T": 1e-5}, "beta_1"),
                                          ({"T": 1}, "T"),
                                          ({"dropout": 1.5}, "dropout"), ({"device": "gpu0"}, "device")])
def test_out_of_range_values_are_refused_naming_the_key(tiny_config, changes, key):
    assert key in refused_by_main(tiny_config, **changes)


def test_conditional_config_refuses_a_negative_label():
    with pytest.raises(ConfigError, match="labels"):
        MainCondition.main({"labels": [-1], "device": "cpu"})


def test_command_line_values_reach_the_training_run(trained_unconditional):
    """Main.py was run with --epoch=1, --channel_mult 1,2, --attn 1, --T 10, --seed=0,
    --training_load_weight None, --clip_denoised false (see conftest)."""
    config = trained_unconditional
    folder = Path(config["save_weight_dir"])
    assert (folder / "ckpt_0_.pt").is_file() and not list(folder.glob("ckpt_1*"))
    state_dict = torch.load(folder / "ckpt_0_.pt", weights_only=True)
    assert unet_config_of(state_dict) == {"T": 10, "channel": 32, "img_channels": 3, "channel_mult": [1, 2],
                                          "num_res_blocks": 1, "attn": [1]}


def test_command_line_error_stops_the_script_before_any_work(tmp_path):
    arguments = as_arguments({"save_weight_dir": tmp_path / "ckpt", "sampled_dir": tmp_path / "samples",
                              "device": "cpu"})
    process = run_script("Main.py", *arguments, "--epochs", "1", cwd=tmp_path)
    assert process.returncode == 2
    assert "'--epochs'" in process.stderr and "'epoch'" in process.stderr
    assert "Traceback" not in process.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_scripts_dicts_hold_the_originals_keys_with_the_defaults_of_the_key_table(reference):
    """Main.py and MainCondition.py list the original's keys (api.json), with the values the
    key tables give them, so a dict of the original's keys and the tables say the same."""
    originals = json.loads((reference / "api.json").read_text())["modelConfig"]
    for script in (Main, MainCondition):
        keys = VARIANTS[script].keys
        assert list(script.modelConfig) == list(originals[f"{script.__name__}.py"])
        assert {key: keys[key].default for key in script.modelConfig} == script.modelConfig


def test_a_keys_type_comes_from_its_default_unless_its_key_says_more():
    """Only a key whose default is None, or that takes a list for a number, names its type."""
    for variant in VARIANTS.values():
        for key, spec in variant.keys.items():
            if spec.kind is not None:
                assert spec.default is None or key == "w", key


def test_the_config_page_lists_every_key_with_its_meaning_and_defaults():
    """docs/config.md's table is the key tables' (the meanings --help shows), row for row."""
    page = (REPO / "docs" / "config.md").read_text()
    assert config_table() in page, "docs/config.md's table differs; it should read:\n" + config_table()


def config_table():
    main, condition = defaults_of("Main"), defaults_of("MainCondition")
    rows = ["| key | `Main.py` | `MainCondition.py` | meaning |", "| --- | --- | --- | --- |"]
    for key in {**UNCONDITIONAL.keys, **CONDITIONAL.keys}:
        spec = UNCONDITIONAL.keys.get(key) or CONDITIONAL.keys[key]
        shown = [f"`{script[key]!r}`" if key in script else "–" for script in (main, condition)]
        if key == "device":
            shown = ['`"cuda"` if present, else `"cpu"`', "the same"]
        if key == "num_workers":
            shown = ["min(4, CPUs)", "the same"]
        rows.append(f"| `{key}` | {shown[0]} | {shown[1]} | {spec.meaning} |")
    return "\n".join(rows) + "\n"
