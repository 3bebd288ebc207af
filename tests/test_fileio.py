"""fileio: the one content digest (streamed, equal to hashlib's over the whole file), the atomic
PNG writer, and atomic writes from several writers at once (threads of one server): never a torn
file, never a writer failing because another one took, renamed or deleted its temp file."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from facediffuser import fileio
from facediffuser.fileio import atomic_write_png, file_sha256


def test_file_sha256_streams_and_equals_hashlib(tmp_path):
    data = os.urandom(3 * 1024 + 17)
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert file_sha256(p) == want
    assert file_sha256(p, chunk=1000) == want  # several chunks, a short last one
    assert file_sha256(data) == want == file_sha256(memoryview(data))
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_every_recorded_digest_is_the_same_digest(tmp_path):
    """Training records, the LoRA's image digests and the evaluator's content order agree."""
    from PIL import Image

    from facediffuser.evaluation.images import image_set_digest
    from facediffuser.trainer.config import TrainConfig
    from facediffuser.trainer.dataset import check_dataset
    from facediffuser.trainer.kohya_format import IMAGE_DIGEST_HEX, image_digest

    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(tmp_path / f"{i}.png")
    scan = check_dataset(TrainConfig(model="m", data=str(tmp_path), output=str(tmp_path / "o.safetensors"), resolution=64))
    for rec in scan.images:
        assert rec.sha256 == file_sha256(rec.path) == hashlib.sha256(rec.path.read_bytes()).hexdigest()
        assert image_digest(rec.path) == image_digest(rec.path.read_bytes()) == rec.sha256[:IMAGE_DIGEST_HEX]
    digest, ordered = image_set_digest([r.path for r in scan.images])
    assert [file_sha256(p) for p in ordered] == sorted(r.sha256 for r in scan.images)


def test_atomic_write_png(tmp_path):
    from PIL import Image

    out = atomic_write_png(Image.new("RGB", (5, 4), (1, 2, 3)), tmp_path / "sub" / "x.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (5, 4) and im.getpixel((0, 0)) == (1, 2, 3)
    assert [p.name for p in out.parent.iterdir()] == ["x.png"]  # no temp file left


def test_two_threads_writing_one_target_never_tear_it_or_fail(tmp_path):
    target = tmp_path / "out" / "lora.safetensors"
    blobs = [bytes([i]) * (256 * 1024 + i) for i in range(2)]  # 256 KiB each: a write is not one syscall
    errors: list[BaseException] = []
    seen: set[bytes] = set()
    start = threading.Barrier(3)

    def writer(blob: bytes) -> None:
        start.wait()
        try:
            for _ in range(60):
                fileio.atomic_write_bytes(target, blob, fsync=False)
        except BaseException as exc:  # noqa: BLE001 - the test reports any failure
            errors.append(exc)

    def reader() -> None:
        start.wait()
        while any(t.is_alive() for t in threads):
            try:
                seen.add(target.read_bytes())
            except FileNotFoundError:
                pass

    threads = [threading.Thread(target=writer, args=(b,)) for b in blobs]
    watcher = threading.Thread(target=reader)
    for t in (*threads, watcher):
        t.start()
    for t in (*threads, watcher):
        t.join()
    assert not errors, errors
    assert target.read_bytes() in blobs
    assert seen and seen <= set(blobs)  # every read saw one writer's complete bytes
    assert sorted(p.name for p in target.parent.iterdir()) == ["lora.safetensors"]  # no temp file left


def test_temp_names_differ_per_thread_and_call(tmp_path):
    names: list[Path] = []

    def grab() -> None:
        with fileio.atomic_path(tmp_path / "x.bin") as tmp:
            names.append(tmp)
            assert tmp.exists() and tmp.parent == tmp_path  # reserved, beside the target
            tmp.write_bytes(b"x")

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    grab()
    assert len(set(names)) == 5
    assert all(n.name.startswith(f"x.bin.tmp-{os.getpid()}-") for n in names)


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "stats.npz"
    fileio.atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(target, fsync=True) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["stats.npz"]


def test_new_files_get_the_usual_permissions(tmp_path):
    """Not mkstemp's 0600: a LoRA in a shared models folder stays readable as any new file is."""
    umask = os.umask(0o022)
    os.umask(umask)
    p = fileio.atomic_write_bytes(tmp_path / "f.bin", b"x")
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask
