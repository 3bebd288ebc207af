"""``facediffuser train``: every setting is a documented flag, TOML works and flags override it,
user errors are one line, and ``accelerate launch`` with two CPU processes writes one file."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from facediffuser import cli
from facediffuser.trainer.config import TrainConfig, config_from_args
from test_training_loop import make_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes") / "data")


@pytest.fixture(scope="module")
def tiny_ckpt(sd15_tiny_checkpoint, tmp_path_factory) -> Path:
    return Path(shutil.copy2(sd15_tiny_checkpoint, tmp_path_factory.mktemp("ckpt") / "tiny-sd15.safetensors"))


def _help_text() -> str:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return " ".join(sub.choices["train"].format_help().split())


def test_help_documents_every_setting_with_its_default():
    text = _help_text()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        if f.default not in (None, False, ""):
            assert f"(default: {f.default})" in text, f"{flag} does not show its default {f.default!r}"
    assert "--config" in text and "accelerate launch" in text


def test_cli_module_does_not_import_torch():
    code = "import sys, facediffuser.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _parse(argv: list[str]) -> TrainConfig:
    return config_from_args(cli.build_parser().parse_args(["train", *argv]))


def test_toml_config_and_flag_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "m.safetensors"\ndata = "faces"\noutput = "o.safetensors"\nrank = 8\nsteps = 50\nflip = true\n')
    cfg = _parse(["--config", str(toml), "--steps", "2", "--lr", "5e-5"])
    assert (cfg.rank, cfg.steps, cfg.lr, cfg.flip, cfg.data) == (8, 2, 5e-5, True, "faces")


def test_every_boolean_can_be_turned_off_over_toml(tmp_path):
    from facediffuser.trainer.config import setting_specs

    toml = tmp_path / "run.toml"
    bools = [s for s in setting_specs() if s.kind == "bool"]
    toml.write_text('model = "m.safetensors"\ndata = "faces"\noutput = "o.safetensors"\n'
                    'validation_split = 0.1\n'  # keep_best_validation needs a validation set
                    + "".join(f"{s.name} = true\n" for s in bools))
    on = _parse(["--config", str(toml)])
    assert all(getattr(on, s.name) is True for s in bools)
    off = _parse(["--config", str(toml), *(s.negative_flag for s in bools)])
    assert all(getattr(off, s.name) is False for s in bools)
    assert _parse(["--config", str(toml), "--no-flip"]).flip is False
    assert _parse(["--config", str(toml), "--cache"]).no_cache is False  # the negation of --no-cache
    assert _parse(["--config", str(toml), "--no-flip", "--flip"]).flip is True  # the last one wins
    text = _help_text()
    assert all(f"{s.flag}, {s.negative_flag}" in text for s in bools)


@pytest.mark.parametrize("line, message", [
    ('steps = "100"', "steps = '100': expected an integer, e.g. steps = 1000"),
    ("lr = true", "lr = True: expected a number, e.g. lr = 0.0001"),
    ("flip = 1", "flip = 1: expected true or false, e.g. flip = true"),
    ("trigger = 5", "trigger = 5: expected a string"),
    ("rank = 0", "--rank must be between 1 and 1024 (got 0) (set in this file)"),
    ("caption_dropout = 1.5", "--caption-dropout must be between 0.0 and 0.99 (got 1.5) (set in this file)"),
    ('optimizer = "sgd"', "--optimizer must be one of adamw, adamw8bit, prodigy (got 'sgd') (set in this file)"),
    ("learning_rate = 1e-4", "unknown setting(s) learning_rate"),
])
def test_bad_toml_values_are_one_line_errors_naming_file_and_key(tmp_path, capsys, line, message):
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "m.safetensors"\ndata = "faces"\noutput = "o.safetensors"\n{line}\n')
    assert cli.main(["train", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{toml}: " in err and message in err, err


def test_a_flag_overrides_a_bad_toml_value_and_is_checked_itself(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "m.safetensors"\ndata = "faces"\noutput = "o.safetensors"\nrank = 0\n')
    assert _parse(["--config", str(toml), "--rank", "8"]).rank == 8
    assert cli.main(["train", "--config", str(toml), "--rank", "2000"]) == 2
    err = capsys.readouterr().err
    assert "--rank must be between 1 and 1024 (got 2000)" in err and str(toml) not in err


def test_unwritable_output_fails_before_data_models_or_caches(tmp_path, capsys):
    # Tests run as root, which writes into read-only folders: a folder that is a file blocks everyone.
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    cache = tmp_path / "cache"
    rc = cli.main(["train", "--model", str(tmp_path / "missing.safetensors"), "--data", str(tmp_path / "no_data"),
                   "--output", str(blocker / "sub" / "face.safetensors"), "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"--output {blocker / 'sub' / 'face.safetensors'}: cannot write to {blocker / 'sub'}" in err, err
    assert not cache.exists()  # the missing model and data were never reached
    rc = cli.main(["train", "--model", str(tmp_path / "missing.safetensors"), "--data", str(tmp_path / "no_data"),
                   "--output", str(tmp_path / "ok" / "face.safetensors"), "--state-dir", str(blocker / "state")])
    err = capsys.readouterr().err
    assert rc == 2 and f"--state-dir {blocker / 'state'}: cannot create or write it ({blocker} is not a folder)" in err, err
    rc = cli.main(["train", "--model", str(tmp_path / "missing.safetensors"), "--data", str(tmp_path / "no_data"),
                   "--output", str(tmp_path)])
    assert rc == 2 and "must end in .safetensors" in capsys.readouterr().err


def test_cli_trains_from_toml_with_overrides(tiny_ckpt, shapes, tmp_path, capsys):
    out = tmp_path / "out" / "face.safetensors"
    toml = tmp_path / "run.toml"
    toml.write_text(f'[train]\nmodel = "{tiny_ckpt}"\ndata = "{shapes}"\noutput = "{out}"\nrank = 4\n'
                    f'resolution = 64\nsteps = 50\nsave_precision = "fp32"\n')
    assert cli.main(["train", "--config", str(toml), "--steps", "2", "--rank", "2"]) == 0
    assert f"wrote {out} (2 steps" in capsys.readouterr().out
    from facediffuser.trainer.kohya_format import load_kohya_lora

    tensors, meta = load_kohya_lora(out)
    assert meta["ss_steps"] == "2" and meta["ss_network_dim"] == "2"
    assert next(v for k, v in tensors.items() if k.endswith("lora_down.weight")).shape[0] == 2


def test_user_errors_are_one_line_and_exit_2(tiny_ckpt, tmp_path, capsys):
    rc = cli.main(["train", "--model", str(tiny_ckpt), "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "dataset folder not found" in err and "Traceback" not in err
    rc = cli.main(["train", "--model", str(tiny_ckpt), "--data", str(tmp_path), "--output", str(tmp_path / "o.bin")])
    assert rc == 2 and "must end in .safetensors" in capsys.readouterr().err


def test_accelerate_two_cpu_processes_write_one_file_with_the_same_keys(tiny_ckpt, shapes, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate CLI not installed")
    common = ["--model", str(tiny_ckpt), "--data", str(shapes), "--steps", "3", "--resolution", "64", "--rank", "4"]
    single = tmp_path / "one" / "face.safetensors"
    assert cli.main(["train", *common, "--output", str(single)]) == 0
    double = tmp_path / "two" / "face.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # accelerate's --cpu launches one process (multi-CPU needs mpirun); --multi_gpu uses torchrun,
    # and the trainer forms a gloo group when there is no CUDA.
    # A free port of our own: torchrun's default 29500 is shared by every run on the machine, and a
    # second suite running this test at the same time would join (and hang) our process group.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    r = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no",
                        "-m", "facediffuser.cli", "train", *common, "--output", str(double)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1  # only the main process reports (and writes)
    from facediffuser.trainer.kohya_format import load_kohya_lora

    t1, m1 = load_kohya_lora(single)
    t2, m2 = load_kohya_lora(double)
    assert set(t1) == set(t2) and set(m1) == set(m2)
    assert m2["ss_total_batch_size"] == "2" and m1["ss_total_batch_size"] == "1"  # two ranks really ran
    assert sorted(p.name for p in double.parent.iterdir()) == [".facediffuser-cache", "face.loss.png", "face.safetensors", "face.state"]
    assert [p.name for p in (double.parent / "face.state").iterdir()] == ["step-00000003"]
    ranks = __import__("torch").load(double.parent / "face.state" / "step-00000003" / "rng.pt", weights_only=True)["ranks"]
    assert len(ranks) == 2 and not __import__("torch").equal(ranks[0]["noise"], ranks[1]["noise"])
