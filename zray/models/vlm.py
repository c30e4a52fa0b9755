"""Teacher / student VLMs through transformers, and their score distribution by teacher forcing (methods.md §1).

`load_vlm` works the same for a tiny model built by `zray.models.tiny` and for a real Qwen2.5-VL / Qwen3-VL
checkpoint (local dir or Hugging Face id). The score distribution is read at the score position, the last
position of the context rendered by `zray.rubric.render_score_context`:

    teacher:  ... <|im_start|>assistant\n<reasoning> Score: |<s_x>
    student:  ... <|im_start|>assistant\n|<s_x>

Shape legend: B batch, L sequence length, V vocabulary, K score bins (9).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from zray.rubric import BUILTIN_RUBRIC, Rubric, ScoreRequest, parse_rubric, render_score_context
from zray.scores import score_distribution, score_token_ids
from zray.training.runs import write_text_atomic


def load_vlm(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
             ) -> tuple[Any, Any]:
    """(model, processor) from a Hugging Face format dir or hub id; the model is in eval mode.

    The processor is this call's own (not `cached_processor`'s); its tokenizer pads on the left by default, so
    that the last position of every row in a batch is its score position (`score_inputs` asks for left padding
    explicitly in any case).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(path))
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype).to(device).eval()
    score_token_ids(processor)  # fail early if the tokenizer lacks the score tokens
    return model, processor


# ------------------------------------------------------------------ which base models work

# model_type -> the transformers class of its checkpoints: the architectures zray builds, trains and serves (a
# Hugging Face dir of either, any size: the tiny zoo or a real Qwen2.5-VL / Qwen3-VL checkpoint).
SUPPORTED_ARCHITECTURES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                           "qwen3_vl": "Qwen3VLForConditionalGeneration"}


def check_vlm_architecture(model_dir: str | Path, setting: str) -> Path:
    """`model_dir` if its config.json names a supported architecture (`model_type`, else `architectures`); else a
    one-line ConfigError naming `setting` (e.g. "train_teacher.base_model"), the dir, what it found and what works."""
    from zray.config import ConfigError

    path = Path(model_dir)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{setting}={str(path)!r} is not allowed: config.json does not read ({err}); expected a "
                          "Hugging Face model dir") from None
    config = config if isinstance(config, dict) else {}
    model_type, archs = config.get("model_type"), config.get("architectures") or []
    if model_type in SUPPORTED_ARCHITECTURES or any(a in SUPPORTED_ARCHITECTURES.values() for a in archs):
        return path
    supported = ", ".join(f"{t} ({c})" for t, c in SUPPORTED_ARCHITECTURES.items())
    raise ConfigError(f"{setting}={str(path)!r} is not allowed: its architecture is model_type={model_type!r} "
                      f"(architectures {archs}); expected a Hugging Face VLM of a supported architecture: {supported}")


# ------------------------------------------------------------------ checkpoints of the learner tasks

SCORING_FILE = "zray_scoring.json"  # {"form": "direct" | "reasoning", "method": ...}: how to evaluate a model


def write_scoring_file(out_dir: str | Path, *, form: str, method: str) -> None:
    """Record in a saved model dir how it scores (`form`) and what trained it, for `zray evaluate`."""
    write_text_atomic(Path(out_dir, SCORING_FILE), json.dumps({"form": form, "method": method}) + "\n")


RUBRIC_FILE = "zray_rubric.json"  # the rubric file format ({"dimensions": {name: [five anchors]}}): what it scores


def write_rubric_file(out_dir: str | Path, rubric: Rubric) -> None:
    """Record in a saved model dir the rubric it was trained on (its dimensions, in order, and their anchors), so
    the reward service serves those dimensions (`read_rubric_file`)."""
    write_text_atomic(Path(out_dir, RUBRIC_FILE), json.dumps({"dimensions": rubric.to_dict()}, indent=1) + "\n")


def read_rubric_file(model_dir: str | Path) -> Rubric:
    """The rubric a model dir records (`write_rubric_file`), or the four built-in dimensions when it records none.
    A malformed file raises ValueError naming it."""
    path = Path(model_dir, RUBRIC_FILE)
    if not path.is_file():
        return BUILTIN_RUBRIC
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"rubric file {str(path)!r} does not read ({err}): expected JSON "
                         '{"dimensions": {name: [five anchors]}}') from None
    return parse_rubric(data, str(path))


def checkpoint_dtype(model_dir: str | Path) -> str:
    """The dtype recorded in a Hugging Face config.json ("float32", "bfloat16", ...), or "auto" if none."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        return "auto"
    config = json.loads(path.read_text())
    text_config = config.get("text_config") or {}
    return str(config.get("dtype") or config.get("torch_dtype") or text_config.get("dtype") or "auto")



def served_dtype(model_dir: str | Path) -> torch.dtype | None:
    """The dtype a fresh engine on `model_dir` serves (its recorded dtype), None when the checkpoint records none."""
    recorded = checkpoint_dtype(model_dir)
    return None if recorded == "auto" else getattr(torch, recorded)


@functools.lru_cache(maxsize=8)
def _load_processor(model_dir: str) -> tuple[Any, str]:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    return processor, processor.tokenizer.padding_side


def cached_processor(model_dir: str) -> Any:
    """The processor of `model_dir`, loaded once per process and shared by every caller, so read-only: callers pass
    `padding_side="left" | "right"` to each processor call instead of setting `tokenizer.padding_side`. A changed
    `padding_side` is caught here (RuntimeError) at the next lookup."""
    processor, padding_side = _load_processor(model_dir)
    if processor.tokenizer.padding_side != padding_side:
        raise RuntimeError(f"the shared processor of {model_dir} has tokenizer.padding_side="
                           f"{processor.tokenizer.padding_side!r}, loaded as {padding_side!r}: a caller mutated it; "
                           "pass padding_side= to the processor call instead")
    return processor


def trainable_vlm(model_dir: str | Path) -> torch.nn.Module:
    """The VLM of `model_dir` in float32, train mode (what the learner tasks build)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32).train()


def save_vlm(model: torch.nn.Module, model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write `model` (safetensors) and the processor of `model_dir` under `out_dir`: loads in transformers and vLLM."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    cached_processor(str(model_dir)).save_pretrained(out)
    return out


def load_vlm_weights(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Load the weights of the VLM saved in `ckpt_dir` into `model` in place (strict)."""
    from transformers import AutoModelForImageTextToText

    loaded = AutoModelForImageTextToText.from_pretrained(str(ckpt_dir), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)


def score_inputs(processor: Any, requests: Sequence[ScoreRequest]) -> Any:
    """Processor outputs (input_ids_BL, attention_mask_BL, pixel_values, image_grid_thw) for a batch, padded on the
    left (whatever the processor's default): the last position of every row is its score position."""
    texts = [render_score_context(processor, r.prompt, r.dimension, r.reasoning, r.anchors) for r in requests]
    images = [r.image for r in requests]
    return processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")


def score_logits(model: Any, processor: Any, requests: Sequence[ScoreRequest]) -> torch.Tensor:
    """logits_BV at the score position of each request (differentiable w.r.t. the model's parameters)."""
    inputs = score_inputs(processor, requests).to(model.device)
    out = model(**inputs, logits_to_keep=1, use_cache=False)
    return out.logits[:, -1, :]


def score_distributions_hf(model: Any, processor: Any, requests: Sequence[ScoreRequest]) -> torch.Tensor:
    """q_BK, the nine-bin score distribution of each request (float32)."""
    return score_distribution(score_logits(model, processor, requests), score_token_ids(processor))


def score_distribution_hf(model: Any, processor: Any, prompt: str, image: Any, dimension: str,
                          reasoning: str | None = None) -> torch.Tensor:
    """q_K for one (prompt, image, dimension[, reasoning]); `reasoning=None` is the student form."""
    request = ScoreRequest(prompt=prompt, image=image, dimension=dimension, reasoning=reasoning)
    return score_distributions_hf(model, processor, [request])[0]
