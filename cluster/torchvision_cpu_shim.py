"""Lets PyPI's CUDA torchvision wheel import beside a +cpu torch (CPU install profile only).

`cluster/install.sh cpu` copies this file into site-packages as `_zray_torchvision_shim.py` with a `.pth`
line that imports it at interpreter start-up, so every process of the venv (pytest, Ray workers, vLLM
engine cores) gets it. It is lazy: it only inserts a meta-path finder that acts when `torchvision` is first
imported. If torchvision's compiled ops then cannot load (`operator torchvision::nms does not exist`), it
defines the two op schemas torchvision's Python side registers against at import (`nms`, `qnms`); calling
them raises, and nothing in transformers' image processors or vLLM's Qwen-VL models calls them. Processes
that never import torchvision pay nothing.

Why keep torchvision at all: transformers 5.19's Qwen-VL image/video processors and vLLM 0.32's Qwen-VL
models import it, so removing it (the other known fix) breaks every Qwen-VL checkpoint.
"""

import sys


class _TorchvisionOpsShim:
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import importlib.util
        import os

        import torch

        spec = importlib.util.find_spec("torchvision")
        if spec is not None and not hasattr(torch.ops.torchvision, "nms"):
            try:
                torch.ops.load_library(os.path.join(os.path.dirname(spec.origin), "_C.so"))
            except (OSError, ImportError, RuntimeError):
                lib = torch.library.Library("torchvision", "DEF")
                lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                sys.modules["_zray_torchvision_ops"] = lib  # keep the library (and its ops) alive
        return spec


if not any(type(f).__name__ == "_TorchvisionOpsShim" for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionOpsShim())
