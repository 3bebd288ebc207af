"""The standard FID feature extractor: the TF-ported Inception v3, pool3 features (2048-d).

We build on torch-fidelity's ``FeatureExtractorInceptionV3`` (the module torchmetrics also uses),
but load its weights ourselves, from a local file, with ``torch.load(weights_only=True)``: the file
cannot be downloaded here, and torch-fidelity's own loader unpickles arbitrary code.

Resize modes (the choice moves FID by several percent, so it is recorded in every ``protocol``):
- ``tf1`` (default): torch-fidelity's TF1-exact bilinear resize to 299 and ``(x - 128) / 128``;
  the standard (TTUR / torch-fidelity / torchmetrics ``antialias=False``) FID.
- ``pytorch-fid``: torch bilinear (half-pixel, no antialias) on ``x / 255`` and ``2x - 1``, as
  pytorch-fid 0.3 does; for numbers comparable with pytorch-fid's.
- ``torch-antialias``: torch bilinear with antialias and ``(x - 128) / 128``, the default of
  torchmetrics >= 1.8 (not TF-compatible).
"""

from __future__ import annotations

import functools
import io
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import UserError
from ..fileio import file_sha256
from ..rng import preserve_global_rng

WEIGHTS_FILE_NAMES = (
    "weights-inception-2015-12-05-6726825d.pth",  # torch-fidelity / torchmetrics name
    "pt_inception-2015-12-05-6726825d.pth",  # pytorch-fid name, same state-dict layout
)
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
ENV_VAR = "FACEDIFFUSER_INCEPTION"
FEATURE_DIM = 2048
EXTRACTOR_NAME = "inception-v3-compat"
#: the resize convention of the Inception input (it moves FID by several percent); one name each
RESIZE_MODES = {
    "tf1": "TF1-compatible bilinear to 299, (x-128)/128: standard FID (TTUR, torch-fidelity)",
    "pytorch-fid": "torch bilinear (no antialias) to 299, 2x/255-1: pytorch-fid 0.3 convention",
    "torch-antialias": "torch bilinear with antialias to 299, (x-128)/128: torchmetrics>=1.8 default, not TF-compatible",
}
DEFAULT_RESIZE = "tf1"
_TRUNK = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
    "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
    "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool",
)


def _torch_hub_checkpoints() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def _candidates_in(folder: Path) -> Iterator[Path]:
    for name in WEIGHTS_FILE_NAMES:
        yield folder / name


def find_inception_weights(path: str | os.PathLike | None = None, *, models_dir: str | os.PathLike | None = None) -> Path:
    """Where the FID Inception weights are, in this order: ``path`` (a file, or a folder holding
    one of the standard names), ``$FACEDIFFUSER_INCEPTION``, ``models_dir`` (e.g. ComfyUI's
    ``models/inception``), ``$TORCH_HOME/hub/checkpoints``. Raises a UserError saying what to put
    where when none is found."""
    for given, what in ((path, "--inception"), (os.environ.get(ENV_VAR) or None, f"${ENV_VAR}")):
        if given is None:
            continue
        p = Path(given).expanduser()
        if p.is_file():
            return p
        if p.is_dir():
            for c in _candidates_in(p):
                if c.is_file():
                    return c
            raise UserError(f"{what} folder {p} holds neither {WEIGHTS_FILE_NAMES[0]} nor {WEIGHTS_FILE_NAMES[1]}")
        raise UserError(f"Inception weights file not found: {p} (from {what})")
    folders = ([Path(models_dir).expanduser()] if models_dir else []) + [_torch_hub_checkpoints()]
    for folder in folders:
        for c in _candidates_in(folder):
            if c.is_file():
                return c
    where = " or ".join(str(f) for f in folders)
    raise UserError(
        f"FID Inception weights not found: put {WEIGHTS_FILE_NAMES[0]} (about 95.6 MB, 23.9 M parameters; "
        f"pytorch-fid's {WEIGHTS_FILE_NAMES[1]} is the same file) in {where}, or pass --inception FILE / "
        f"set {ENV_VAR}; it is published at {WEIGHTS_URL}"
    )


def weights_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of the weights file (cached per path, size and mtime): it names the extractor."""
    p = Path(path).resolve()
    st = p.stat()
    return _file_sha256(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)  # 64-byte strings, bounded: a server that sees many files keeps 32
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def load_inception_state_dict(path: str | os.PathLike) -> dict:
    """The state dict, loaded without unpickling code; clear errors for wrong or truncated files."""
    import torch

    p = Path(path)
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated download, TorchScript archive, arbitrary pickle ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{p} is not a loadable FID Inception state dict ({first[:200]}); expected "
            f"{WEIGHTS_FILE_NAMES[0]} (clean-fid's TorchScript inception-2015-12-05.pt is a different format)"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{p} is not a plain state dict of tensors; expected {WEIGHTS_FILE_NAMES[0]}")
    return sd


def _module_class():
    """torch-fidelity's extractor with its loader replaced by ours (weights_only, local file)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class FIDInceptionV3(FeatureExtractorInceptionV3):
        def __init__(self, state_dict: dict, source: str) -> None:
            self._fd_state_dict = state_dict
            self._fd_source = source
            empty = io.BytesIO()  # torch-fidelity torch.load()s this (our own bytes) and hands the
            import torch  # result to load_state_dict, which we redirect to the real weights.

            torch.save({}, empty)
            empty.seek(0)
            super().__init__(EXTRACTOR_NAME, ["2048"], feature_extractor_weights_path=empty)
            del self._fd_state_dict

        def load_state_dict(self, state_dict, strict=True, assign=False):
            sd = getattr(self, "_fd_state_dict", None)
            if sd is None:
                return super().load_state_dict(state_dict, strict=strict, assign=assign)
            own = set(self.state_dict().keys())
            missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
            if missing or unexpected:
                raise UserError(
                    f"{self._fd_source} does not have the FID Inception layout: "
                    f"{len(missing)} missing keys (e.g. {', '.join(missing[:3]) or '-'}), "
                    f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3]) or '-'})"
                )
            try:
                return super().load_state_dict(sd, strict=True)
            except RuntimeError as exc:
                raise UserError(f"{self._fd_source}: wrong tensor shapes for the FID Inception ({str(exc).splitlines()[-1].strip()[:200]})") from None

    return FIDInceptionV3


@contextmanager
def _fp32_exact(device: Any) -> Iterator[None]:
    """TF32 convolutions/matmuls perturb features (and FID) on Ampere+ GPUs: off for the block,
    then the host's own setting comes back. Only on CUDA (no other device has TF32), and through
    torch's ``fp32_precision`` API where it exists: reading the legacy ``allow_tf32`` flags raises
    once a host has set the new API (torch >= 2.9)."""
    import torch

    if torch.device(device).type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(cudnn, "conv"):
        saved = (matmul.fp32_precision, cudnn.conv.fp32_precision)
        matmul.fp32_precision, cudnn.conv.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision, cudnn.conv.fp32_precision = saved
        return
    saved = (cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


class InceptionFeatures:
    """Pool3 features of the FID Inception v3, batched, fp32, with the protocol recorded.

    ``weights``/``models_dir`` are searched as in :func:`find_inception_weights`. ``channels_last``
    defaults to on: measured 1.5x faster on CPU (mkldnn), with features within ~1e-4 of the NCHW
    path (fp32 rounding; FID moves by ~1e-6 relative); pass False for torch-fidelity-exact features.
    """

    dim = FEATURE_DIM

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        *,
        models_dir: str | os.PathLike | None = None,
        device: Any = None,
        batch_size: int = 50,
        resize: str = DEFAULT_RESIZE,
        channels_last: bool | None = None,
        progress: bool = True,
    ) -> None:
        import torch

        if resize not in RESIZE_MODES:
            raise UserError(f"unknown resize mode {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1 (got {batch_size})")
        self.weights_path = find_inception_weights(weights, models_dir=models_dir)
        self.weights_sha256 = weights_sha256(self.weights_path)
        self.resize = resize
        self.batch_size = int(batch_size)
        self.progress = progress
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.channels_last = True if channels_last is None else bool(channels_last)
        sd = load_inception_state_dict(self.weights_path)
        with preserve_global_rng():  # the layers' random init (overwritten by the weights) is not the caller's draw
            model = _module_class()(sd, str(self.weights_path))
        model = model.to(device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval().requires_grad_(False)

    @property
    def device(self) -> "torch.device":  # noqa: F821
        """Where the weights are now (a host's model manager, e.g. ComfyUI's, may move them)."""
        return next(self.model.parameters()).device

    # --- what produced the numbers ------------------------------------------------------------
    @property
    def cache_key(self) -> str:
        """Identifies the features this extractor gives (weights content + preprocessing)."""
        return f"{EXTRACTOR_NAME}|{self.weights_sha256}|{self.resize}|pool3"

    def protocol(self, n: int | None = None) -> dict:
        """The facts a reader needs to compare an FID: extractor, weights, resize, N."""
        import torch
        import torch_fidelity

        p = {
            "extractor": f"{EXTRACTOR_NAME} pool3 ({FEATURE_DIM}-d), torch-fidelity {torch_fidelity.__version__} FeatureExtractorInceptionV3",
            "weights": self.weights_path.name,
            "weights_sha256": self.weights_sha256,
            "resize": self.resize,
            "resize_description": RESIZE_MODES[self.resize],
            "dtype": "float32 (TF32 off)",
            "torch": torch.__version__,
        }
        if n is not None:
            p["n"] = int(n)
        return p

    # --- features -----------------------------------------------------------------------------
    def _forward(self, x_uint8):
        import torch
        import torch.nn.functional as F

        x = x_uint8.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.resize == "tf1":
            return self.model(x)[0]  # torch-fidelity's own forward: TF1 resize, (x-128)/128
        if self.resize == "pytorch-fid":
            x = x.to(torch.float32) / 255.0
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = 2 * x - 1
        else:
            x = F.interpolate(x.to(torch.float32), size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
            x = (x - 128) / 128
        for name in _TRUNK:
            x = getattr(self.model, name)(x)
        return torch.flatten(x, 1)

    def __call__(self, images) -> "torch.Tensor":  # noqa: F821
        """Features (N, 2048) float32 on CPU of uint8 NCHW images or float [0,1] NHWC (ComfyUI IMAGE)."""
        import torch

        from .images import to_uint8_nchw

        x = to_uint8_nchw(images)
        out = []
        with torch.inference_mode(), _fp32_exact(self.device):
            for i in range(0, x.shape[0], self.batch_size):
                out.append(self._forward(x[i:i + self.batch_size]).float().cpu())
        return torch.cat(out)

    def features_from_files(self, files: Sequence[str | os.PathLike], *, desc: str = "Inception features") -> "np.ndarray":  # noqa: F821
        """Features (N, 2048) float32 of image files, in the given order, with a progress bar."""
        import numpy as np
        import torch
        from tqdm import tqdm

        from .images import iter_image_batches

        feats = np.empty((len(files), FEATURE_DIM), dtype=np.float32)
        done = 0
        with tqdm(total=len(files), desc=desc, unit="img", disable=not self.progress, leave=False) as bar, \
                torch.inference_mode(), _fp32_exact(self.device):
            for _, batch in iter_image_batches(files, self.batch_size):
                f = self._forward(batch).float().cpu().numpy()
                feats[done:done + len(f)] = f
                done += len(f)
                bar.update(len(f))
        return feats
