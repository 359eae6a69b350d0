import dataclasses
import subprocess
import sys

from medfedpure.cli import main


def test_presets_listed(capsys):
    assert main(["presets"]) == 0
    assert "br35h-cpu" in capsys.readouterr().out


def test_missing_data_folder_is_one_clear_error(tmp_path, capsys):
    code = main(["train", "--preset", "br35h-cpu", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "absent" in err and "Traceback" not in err


def test_bad_override_is_one_clear_error(capsys):
    assert main(["train", "--preset", "demo", "train.epochz=3"]) == 2
    assert "train.epochz" in capsys.readouterr().err


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "medfedpure.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout


def test_pretrain_commands_share_the_clear_errors(tmp_path, capsys):
    for command in ("pretrain-mae", "pretrain-diffusion"):
        code = main([command, "--preset", "br35h-cpu", "--data", str(tmp_path / "nowhere")])
        err = capsys.readouterr().err
        assert code == 2 and "nowhere" in err and "Traceback" not in err


def test_progress_argument_reaches_the_decoding_bar(tmp_path, capsys):
    from PIL import Image

    from medfedpure.config import DataConfig
    from medfedpure.data import load_dataset

    for name in ("no", "yes"):
        for i in range(2):
            (tmp_path / "scans" / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(tmp_path / "scans" / name / f"{i}.png")
    data = DataConfig(dataset="folder", root=str(tmp_path / "scans"), image_size=8)
    load_dataset(dataclasses.replace(data, cache_dir=str(tmp_path / "cache-a")))
    assert "decoding" in capsys.readouterr().err
    load_dataset(dataclasses.replace(data, cache_dir=str(tmp_path / "cache-b")), progress=False)
    assert "decoding" not in capsys.readouterr().err


def test_evaluate_needs_a_folder_or_own_test(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_:  # argparse: one of --data / --own-test
        main(["evaluate", "--run", str(tmp_path)])
    assert exit_.value.code == 2 and "--own-test" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path / "norun"), "--own-test"]) == 2
    err = capsys.readouterr().err
    assert "norun" in err and "Traceback" not in err


def test_the_experiment_summary_prints_the_headline_and_brackets_only_with_the_paper(tmp_path, capsys):
    """A newcomer reads the adaptive headline (the figure the README calls the headline) under each
    defended row, and 'in brackets' is said only where the paper has figures to put there."""
    from medfedpure.cli import _print_tables

    row = {"method": "MedFedPure (graded, disagreement detector)", "clean": 84.17, "adv": 80.0, "paper_clean": None,
           "paper_adv": None, "adaptive": 50.0, "adaptive_ci": [31.3, 68.7],
           "adaptive_attack": "eot-pgd:margin (2 steps x 2 draws, margin), 30 scans"}
    _print_tables({"table": "II", "rows": [row]}, tmp_path)
    out = capsys.readouterr().out
    assert "headline 50.0% [31.3, 68.7] under eot-pgd:margin" in out and "brackets" not in out
    _print_tables({"table": "II", "rows": [{**row, "paper_clean": 97.67, "paper_adv": 87.33}]}, tmp_path)
    out = capsys.readouterr().out
    assert "in brackets" in out and "[97.67 / 87.33]" in out
