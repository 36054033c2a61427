"""Where ImageNet weights for the transfer backbones come from.

Keras downloads them into its cache (`$KERAS_HOME/models`, default `~/.keras/models`). On a
machine without internet, point `CLEANMESSY_KERAS_WEIGHTS` at a folder holding the files (e.g.
`../shared/keras-weights`): a file found there or in the cache is loaded directly, so Keras never
tries to download. A machine-specific folder is an environment setting, not a pipeline param:
moving the repo to another machine must not change what DVC thinks the pipeline is.
"""

from __future__ import annotations

import os
from pathlib import Path

from cleanmessy.errors import UserError

ENV = "CLEANMESSY_KERAS_WEIGHTS"
BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications"
V1_ALPHAS = {0.25: "2_5", 0.5: "5_0", 0.75: "7_5", 1.0: "1_0"}
V2_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)


def keras_cache() -> Path:
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"


def candidate_names(arch: str, alpha: float, size: int) -> list[str]:
    """File names that hold the no-top ImageNet weights, best first. Keras names a file by the
    input size it was trained at; convolution weights fit any size, so the 224 px file serves
    other sizes too (Keras itself falls back to it for MobileNet v1)."""
    if arch == "mobilenet":
        text = V1_ALPHAS[alpha]
        sizes = [size, 224] if size in (128, 160, 192) else [224]
        return [f"mobilenet_{text}_{s}_tf_no_top.h5" for s in sizes]
    if arch == "mobilenet_v2":
        sizes = [size, 224] if size in (96, 128, 160, 192) else [224]
        names = [f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha:g}_{s}_no_top.h5" for s in sizes]
        # The reconstruction in shared/keras-weights (see its WEIGHTS.md) under its own name.
        return names + [f"mobilenet_v2_{alpha:g}_224_no_top_tm.h5"]
    raise ValueError(f"no ImageNet weights for arch {arch!r}")


def check_alpha(arch: str, alpha: float) -> None:
    allowed = list(V1_ALPHAS) if arch == "mobilenet" else list(V2_ALPHAS) if arch == "mobilenet_v2" else None
    if allowed is not None and alpha not in allowed:
        raise UserError(f"params.yaml: train.alpha {alpha} is not available for {arch}; use one of "
                        f"{', '.join(map(str, allowed))}")


def find_local(arch: str, alpha: float, size: int) -> Path | None:
    """The first candidate file in `$CLEANMESSY_KERAS_WEIGHTS`, then in Keras's cache."""
    folders = [Path(os.environ[ENV]).expanduser()] if os.environ.get(ENV) else []
    folders.append(keras_cache())
    for name in candidate_names(arch, alpha, size):
        for folder in folders:
            if (folder / name).is_file():
                return folder / name
    return None


def missing_message(arch: str, alpha: float, size: int, cause: Exception) -> str:
    name = candidate_names(arch, alpha, size)[0]
    sub = "mobilenet" if arch == "mobilenet" else "mobilenet_v2"
    return (f"ImageNet weights for {arch} (alpha {alpha:g}) could not be downloaded ({type(cause).__name__}). "
            f"Put {name} into {keras_cache()} (from {BASE_URL}/{sub}/{name}), or set {ENV} to a folder "
            "holding it, or set train.weights: none")
