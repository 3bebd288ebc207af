"""``facediffuser train`` in the command's own process keeps freed memory (no fresh, page-faulting
mmap per large block); a host's call of the same code (``cli.main`` without ``own_process``, or
``train()``) leaves the allocator alone, and so does the command wherever the user chose a setting.

Each case runs in a fresh interpreter and measures with glibc's own counters: ``mallinfo2().hblkhd``
(bytes in mmapped blocks: what a 64 MiB block adds to it) and the minor page faults of re-allocating a block that was just freed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux)")

PROBE = textwrap.dedent('''
    import ctypes, json, resource, sys
    SETUP
    libc = ctypes.CDLL(None)
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = Info
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20

    def touch_once():
        before = libc.mallinfo2().hblkhd
        p = libc.malloc(size)
        mmapped = libc.mallinfo2().hblkhd - before  # bytes this block added to the mmapped ones
        ctypes.memset(p, 1, size)
        libc.free(p)
        return mmapped

    touch_once()  # the first time, the pages are new in any case
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    mmapped = touch_once()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    print(json.dumps({"mmapped": mmapped, "faults": faults, "did": DID}))
''')


def _probe(setup: str, did: str = "None", env: dict | None = None) -> dict:
    code = PROBE.replace("SETUP", setup).replace("DID", did)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "FACEDIFFUSER_MALLOC"}
    full_env.update(env or {}, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # import what this process imports
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_plain_process_mmaps_large_blocks_and_faults_them_in_again():
    """The baseline the other tests compare with: glibc's default really does what allocator.py says."""
    r = _probe("")
    assert r["mmapped"] >= 64 << 20
    assert r["faults"] > 10_000  # 64 MiB of 4 KiB pages, all new again (huge pages would be ~32)


def test_keep_freed_memory_reuses_the_block_without_page_faults():
    r = _probe("from facediffuser.allocator import keep_freed_memory; did = keep_freed_memory()", "did")
    assert r["did"].startswith("glibc ") and "kept for reuse" in r["did"]
    assert r["mmapped"] == 0
    assert r["faults"] < 100, r


def _train_then_probe(ckpt: Path, data: Path, out: Path, own_process: bool) -> dict:
    """A 2-step ``facediffuser train`` through ``cli.main`` in a fresh process, then the probe there."""
    argv = ["train", "--model", str(ckpt), "--data", str(data), "--output", str(out), "--steps", "2",
            "--resolution", "64", "--rank", "2", "--cache-dir", str(out.parent / "cache")]
    return _probe(textwrap.dedent(f'''
        from facediffuser import cli
        assert cli.main({argv!r}, own_process={own_process}) == 0
    '''))


def test_the_train_command_in_its_own_process_keeps_freed_memory_and_a_host_call_does_not(sd15_tiny_checkpoint, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent / "trainer"))
    from test_training_loop import make_shapes

    data = make_shapes(tmp_path / "data")
    own = _train_then_probe(sd15_tiny_checkpoint, data, tmp_path / "own" / "face.safetensors", own_process=True)
    assert own["mmapped"] == 0 and own["faults"] < 100, own
    host = _train_then_probe(sd15_tiny_checkpoint, data, tmp_path / "host" / "face.safetensors", own_process=False)
    assert host["mmapped"] >= 64 << 20 and host["faults"] > 10_000, host
    assert (tmp_path / "own" / "face.safetensors").is_file() and (tmp_path / "host" / "face.safetensors").is_file()


def test_train_calls_on_train_start_once_before_the_first_step(sd15_tiny_checkpoint, tmp_path):
    """Where the command switches its allocator: after loading and the cache build, before step 1."""
    sys.path.insert(0, str(Path(__file__).parent / "trainer"))
    from test_training_loop import make_shapes, tiny_config

    from facediffuser.trainer.training_loop import TrainCallbacks, train

    starts, steps = [], []
    cfg = tiny_config(sd15_tiny_checkpoint, make_shapes(tmp_path / "data"), tmp_path / "o.safetensors", steps=2)
    train(cfg, callbacks=TrainCallbacks(on_train_start=lambda: starts.append(len(steps)),
                                        on_step=lambda s, t, l: steps.append(s)))
    assert starts == [0] and steps == [1, 2]


def test_generation_commands_in_their_own_process_keep_freed_memory_from_the_start(tmp_path):
    bad = ["generate", "--model", str(tmp_path / "none.safetensors"), "--prompts", str(tmp_path / "none.txt"),
           "--out", str(tmp_path / "out")]
    for own, kept in ((True, True), (False, False)):
        r = _probe(textwrap.dedent(f'''
            from facediffuser import cli
            assert cli.main({bad!r}, own_process={own}) == 2  # a one-line error, after the set-up
        '''))
        assert (r["mmapped"] == 0 and r["faults"] < 100) if kept else (r["mmapped"] >= 64 << 20), (own, r)


def test_the_entry_point_runs_main_as_its_own_process(monkeypatch):
    from facediffuser import cli

    seen = {}
    monkeypatch.setattr(cli, "main", lambda argv=None, *, own_process=False: seen.setdefault("own", own_process) and 0)
    cli.entry()
    assert seen == {"own": True}


@pytest.mark.parametrize("env, why", [
    ({"FACEDIFFUSER_MALLOC": "system"}, "FACEDIFFUSER_MALLOC=system"),
    ({"MALLOC_ARENA_MAX": "2"}, "MALLOC_ARENA_MAX is set"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}, "GLIBC_TUNABLES is set"),
])
def test_a_users_own_allocator_choice_is_left_alone(env, why):
    r = _probe("from facediffuser.allocator import keep_freed_memory; did = keep_freed_memory()", "did", env)
    assert r["did"] == f"left as is: {why}"
    assert r["mmapped"] >= 64 << 20


def test_the_console_script_is_the_entry_point():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["scripts"]["facediffuser"] == "facediffuser.cli:entry"
