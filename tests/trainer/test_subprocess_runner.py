"""Training in a child process (what the web UI's tab does): progress from the child's JSON lines,
a clean stop that keeps a resumable state, and a resume that ends in the same bytes as a run that
never stopped. The child is the real CLI (`python -m facediffuser.cli train`) on a tiny model."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from facediffuser.trainer.subprocess_runner import CLIRun, TrainRun, import_root, read_progress, summarize
from test_training_loop import make_shapes

REPO = Path(__file__).resolve().parents[2]


def _records(path: Path, rows: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def test_progress_lines_give_step_loss_speed_and_eta(tmp_path):
    rows = [{"event": "step", "step": s, "total": 10, "loss": 1.0 / s, "time": 100.0 + 2 * s} for s in range(1, 5)]
    steps, end = read_progress(_records(tmp_path / "p.jsonl", rows, tail='{"event": "step", "st'))  # a line being written
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and end is None
    prog = summarize(steps, end, running=True, stopping=False, returncode=None, started_at=100.0)
    assert (prog.status, prog.step, prog.total, prog.loss) == ("training", 4, 10, 0.25)
    assert prog.it_per_s == pytest.approx(0.5) and prog.eta_s == pytest.approx(12.0)
    assert prog.losses == [1.0, 0.5, 1 / 3, 0.25]
    assert prog.line() == "training: step 4/10, loss 0.2500, 2.0 s/it, ETA 0:00:12"
    assert summarize([], None, running=True, stopping=False, returncode=None, started_at=time.time() - 3).status == "loading"
    assert summarize(steps, None, running=True, stopping=True, returncode=None, started_at=100.0).status == "stopping"
    stopped = summarize(steps, {"event": "end", "status": "cancelled", "steps": 4, "total": 10}, running=False, stopping=True,
                        returncode=1, started_at=100.0)
    assert stopped.status == "stopped" and "resumable at step 4/10" in stopped.message
    failed = summarize(steps, None, running=False, stopping=False, returncode=2, started_at=100.0, error="bad data")
    assert (failed.status, failed.message) == ("failed", "bad data")
    # a resumed run: steps of the earlier child count for the loss history, not for its speed
    later = rows + [{"event": "step", "step": s, "total": 10, "loss": 0.1, "time": 500.0 + s} for s in (5, 6, 7)]
    prog = summarize(later, None, running=True, stopping=False, returncode=None, started_at=490.0)
    assert prog.it_per_s == pytest.approx(1.0) and len(prog.losses) == 7


def test_import_root_links_any_folder_name(tmp_path):
    odd = tmp_path / "sd-webui-facediffuser"
    odd.symlink_to(REPO, target_is_directory=True)
    root = import_root(odd, tmp_path / "import")
    assert (root / "facediffuser").resolve() == REPO.resolve()
    assert import_root(odd, tmp_path / "import") == root  # idempotent
    job = CLIRun(tmp_path / "job", pythonpath=[root])
    job.start("train", ["--help"])
    assert job.wait(120) == 0
    assert "--stop-file" in job.log_tail() and "--progress-file" in job.log_tail()


@pytest.fixture(scope="module")
def tiny(sd15_tiny_checkpoint, tmp_path_factory):
    data = make_shapes(tmp_path_factory.mktemp("shapes") / "data")
    return sd15_tiny_checkpoint, data


def _args(ckpt, data, out: Path, state: Path, cache: Path, steps: int = 40) -> list[str]:
    return ["--model", str(ckpt), "--data", str(data), "--output", str(out), "--steps", str(steps), "--resolution", "64",
            "--rank", "4", "--lr", "1e-3", "--seed", "3", "--state-dir", str(state), "--cache-dir", str(cache)]


def _env():
    return {"SOURCE_DATE_EPOCH": "1700000000", "OMP_NUM_THREADS": "1"}


def test_stop_keeps_a_state_and_start_resumes_to_the_same_file(tmp_path, tiny):
    ckpt, data = tiny
    root = import_root(REPO, tmp_path / "import")
    ref = TrainRun(tmp_path / "ref", tmp_path / "ref" / "state", pythonpath=[root], env=_env())
    ref_out = tmp_path / "ref" / "face.safetensors"  # same name: the name is in the metadata
    assert ref.start(_args(ckpt, data, ref_out, tmp_path / "ref" / "state", tmp_path / "cache")) is False
    assert ref.wait(300) == 0 and ref.progress().status == "finished"

    out = tmp_path / "loras" / "face.safetensors"
    run = TrainRun(tmp_path / "run", tmp_path / "run" / "state", pythonpath=[root], env=_env())
    args = _args(ckpt, data, out, tmp_path / "run" / "state", tmp_path / "cache")
    assert run.start(args) is False
    with pytest.raises(Exception, match="still going"):
        run.start(args)
    deadline = time.time() + 300
    while run.progress().step < 2 and run.running and time.time() < deadline:
        time.sleep(0.05)
    run.stop()
    assert run.wait(300) == 1
    stopped = run.progress()
    assert stopped.status == "stopped" and 2 <= stopped.step < 40, stopped.line()
    assert not out.exists() and run.resumable()

    assert run.start(args) is True  # Start again: resumes from the saved state
    assert run.wait(300) == 0
    done = run.progress()
    assert done.status == "finished" and done.output == str(out) and done.step == 40
    assert len(done.losses) == 40  # one loss per step over both children, none repeated
    assert out.read_bytes() == ref_out.read_bytes()
    assert "resuming from" in run.log_tail()
    assert not run.resumable()


def test_a_failed_child_reports_the_clis_one_line_error(tmp_path, tiny):
    _, data = tiny
    run = TrainRun(tmp_path / "run", tmp_path / "state", pythonpath=[import_root(REPO, tmp_path / "import")], env=_env())
    run.start(_args(tmp_path / "missing.safetensors", data, tmp_path / "o.safetensors", tmp_path / "state", tmp_path / "c"))
    assert run.wait(300) == 2
    prog = run.progress()
    assert prog.status == "failed" and "missing.safetensors" in prog.message and "\n" not in prog.message
