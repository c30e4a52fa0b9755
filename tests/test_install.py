"""The CPU install fix holds: PyPI's CUDA torchvision stays (Qwen-VL processors and vLLM's Qwen-VL models
import it) behind the import shim, torchaudio/torchcodec are gone, and the stacks import together."""

import importlib.util
import subprocess
import sys

import pytest
import torch

CPU_PROFILE = torch.version.cuda is None


@pytest.mark.skipif(not CPU_PROFILE, reason="CPU profile only")
@pytest.mark.parametrize("name", ["torchaudio", "torchcodec"])
def test_unused_cuda_media_wheels_are_absent_on_cpu(name):
    assert importlib.util.find_spec(name) is None, f"{name} is installed; run `bash cluster/install.sh cpu`"


@pytest.mark.skipif(not CPU_PROFILE, reason="CPU profile only")
def test_torchvision_shim_is_installed_for_every_process():
    assert importlib.util.find_spec("_zray_torchvision_shim") is not None, "run `bash cluster/install.sh cpu`"
    code = "import sys; print(any(type(f).__name__ == '_TorchvisionOpsShim' for f in sys.meta_path))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"  # loaded by the .pth at interpreter start-up


@pytest.mark.slow  # imports vLLM, Ray, DeepSpeed and the model stacks in one process (about 10 s)
def test_heavy_stack_imports():
    code = (
        "import torchvision\n"
        "from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration\n"
        "from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor\n"
        "from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor\n"
        "from diffusers import ZImagePipeline, ZImageTransformer2DModel\n"
        "import peft, deepspeed, ray, pyarrow\n"
        "from vllm import LLM, SamplingParams\n"
        "from vllm.model_executor.models import qwen2_5_vl\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
