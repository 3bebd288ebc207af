"""fileio: the one content digest (streamed, equal to hashlib's over the whole file) and the
atomic PNG writer; every module that records a file's identity uses the same digest."""

from __future__ import annotations

import hashlib
import os

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
