"""Tiny, seeded, offline model builders: a local tokenizer, tiny Qwen-VL models and a tiny Z-Image pipeline.

Everything is saved in Hugging Face format (`save_pretrained`), so the same directories load through the same
loaders as real checkpoints: transformers and vLLM for the VLMs, `diffusers.ZImagePipeline` for the generator.

- `build_tokenizer()`: a byte-level BPE (the Qwen2 pre-tokenizer, so digits are split one by one) trained on a
  small built-in Shapes-world corpus, with the Qwen special tokens first (ids 0..13), the Qwen-VL chat
  template, and the nine score tokens as single added tokens (the last nine ids).
- `build_tiny_vlm(cfg, out_dir)`: a tiny Qwen2.5-VL or Qwen3-VL (per `cfg.arch`) with its processor. The image
  processor is set up so that an `image_size` x `image_size` image is not resized and gives
  (image_size / (patch * merge))^2 image tokens (16 for 64x64 with patch 8, merge 2).
- `build_tiny_zimage(cfg, out_dir)`: a tiny Z-Image pipeline (transformer, 16-latent-channel VAE, Qwen3 text
  encoder using the same local tokenizer, flow-matching Euler scheduler).
- `build_zoo(run_cfg, out_dir)`: teacher, student and generator into subfolders, idempotent (rebuilt when the
  config, the image size or the tokenizer (`tokenizer_digest`) changed).

transformers' Qwen-VL image and video processors, and vLLM's Qwen-VL models, import torchvision: it must be
importable (PyPI's CUDA torchvision beside a +cpu torch needs the `torchvision::nms` shim, see the stack notes).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from zray.config import GeneratorConfig, VLMConfig
from zray.rubric import DIMENSIONS, RUBRICS, SYSTEM_TEXT, answer_text, rubric_text
from zray.scores import SCORE_BINS, SCORE_TOKENS
from zray.training.runs import write_text_atomic

# Qwen2.5-VL's special tokens, in Qwen's order (real ids 151643..151656; here 0..13).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
TOKENIZER_VOCAB_SIZE = 1024  # BPE target before the nine score tokens; the corpus may saturate below it

# Sizes that VLMConfig / GeneratorConfig do not carry (yet): fixed here.
VISION_MLP_RATIO = 2  # vision intermediate size = ratio * vision_hidden_size
MAX_POSITION_EMBEDDINGS = 4096  # >= VLLMConfig.max_model_len
TEXT_ENCODER_HEAD_DIM = 32  # Z-Image's Qwen3 text encoder: heads = text_hidden_size // 32
TEXT_ENCODER_MLP_RATIO = 2

# The Qwen2-VL / Qwen2.5-VL chat template (images and videos inside list contents; string contents too).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3's text chat template (what Z-Image's tokenizer uses), without tools: prompts become
# "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", about 25 tokens for a Shapes prompt, so the
# transformer's caption sequence pads to 32 tokens instead of 64 with the VL template's default system turn.
QWEN3_TEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
_SHAPES = ("circle", "square", "triangle", "star")
_BACKGROUNDS = ("white", "black", "gray")
_RELATIONS = ("left of", "right of", "above", "below")
_NUMBERS = ("one", "two", "three", "a", "an", "no")
_EXTRA = (
    "I see the prompt asks for but there is are and with on in of background small large slight heavy blur "
    "noise missing extra wrong color shape count relation image object objects circles squares triangles stars "
    "system user assistant picture score Score: rubric dimension alignment realism aesthetics plausibility "
    "caption describe the scene it has one too many few; , . : yes no true false good bad"
)


def tokenizer_corpus() -> list[str]:
    """The built-in training corpus: Shapes-world prompts, captions, reasoning, rubrics and score lines."""
    # The chat template's own words (roles, default system turn) and the captioning instruction, each at a line
    # start as they follow a special token: one token each, as in a real Qwen tokenizer (spelt out in pieces they
    # were 14 more tokens in every captioning example).
    lines: list[str] = [_EXTRA, SYSTEM_TEXT, "system\nYou are a helpful assistant.", "user", "assistant",
                        "Describe the image."]
    for dim in DIMENSIONS:
        lines.append(rubric_text(dim))
        lines.extend(RUBRICS[dim])
    for i, color in enumerate(_COLORS):
        for j, shape in enumerate(_SHAPES):
            bg = _BACKGROUNDS[(i + j) % len(_BACKGROUNDS)]
            other = _COLORS[(i + 2) % len(_COLORS)] + " " + _SHAPES[(j + 1) % len(_SHAPES)]
            rel = _RELATIONS[(i + j) % len(_RELATIONS)]
            num = _NUMBERS[(i + j) % 3]
            lines.append(f"{num} {color} {shape}s and a {other} on a {bg} background")
            lines.append(f"a {color} {shape} {rel} a {other}")
            lines.append(f"I see {num} {color} {shape}s; the prompt asks for {other}. slight blur")
    for k, s in enumerate(SCORE_BINS):
        lines.append(f"Prompt: a red circle\nDimension: {DIMENSIONS[k % 4]}\nGive the score.")
        lines.append(answer_text(f"{s:.1f}", "I see a red circle."))
    lines.append(" ".join(str(n) for n in range(100)))
    lines.extend(_caption_lines())
    return lines * 4  # repetition makes the frequent words single tokens


def _caption_lines(num: int = 96) -> list[str]:
    """Scene descriptions (canonical and compact) of seeded random scenes with random defects, so that the
    caption vocabulary (field names, defect names, severities) tokenizes into few tokens."""
    import numpy as np

    from zray.data.captions import describe, restyle
    from zray.data.scene import DEFECT_DIMENSION, Defects
    from zray.data.world import sample_scene

    rng = np.random.default_rng(0)
    names = sorted(DEFECT_DIMENSION)
    lines = []
    for _ in range(num):
        scene = sample_scene(rng, 3, 0.3)
        chosen = rng.choice(names, size=int(rng.integers(0, 3)), replace=False)
        text = describe(scene, Defects(**{str(k): float(rng.choice([0.3, 0.7])) for k in chosen}))
        lines += [text, restyle(text, "compact")]
    return lines


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB_SIZE) -> Any:
    """The local Qwen2-style tokenizer (a transformers `Qwen2Tokenizer`), deterministic and offline."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    raw = Tokenizer(BPE())
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(tokenizer_corpus(), trainer)
    model = json.loads(raw.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                         eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in SCORE_TOKENS])
    tok.chat_template = QWEN_VL_CHAT_TEMPLATE
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.convert_tokens_to_ids(t) != i:
            raise RuntimeError(f"special token {t!r} got id {tok.convert_tokens_to_ids(t)}, expected {i}")
    return tok


# ----------------------------------------------------------------------------------------------- VLMs


def mrope_section(head_dim: int) -> list[int]:
    """Multimodal rotary sections (t, h, w) summing to head_dim / 2, in Qwen's 16:24:24 proportion."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def input_side(image_size: int, cfg: VLMConfig) -> int:
    """The side an image_size x image_size image has when it is cut into patches (`VLMConfig.vision_input_size`)."""
    return cfg.vision_input_size or image_size


def image_tokens(image_size: int, cfg: VLMConfig) -> int:
    """Image tokens an image_size x image_size image becomes: (input side / (patch * merge))^2."""
    return (input_side(image_size, cfg) // (cfg.vision_patch_size * cfg.spatial_merge_size)) ** 2


def _check_vlm(cfg: VLMConfig, image_size: int) -> None:
    factor = cfg.vision_patch_size * cfg.spatial_merge_size
    side = input_side(image_size, cfg)
    if side % factor:
        name = "VLMConfig.vision_input_size" if cfg.vision_input_size else "image_size"
        raise ValueError(f"{name}={side} is not allowed: expected a multiple of "
                         f"vision_patch_size * spatial_merge_size = {factor}")
    if cfg.arch == "qwen2_5_vl" and cfg.hidden_size != cfg.num_heads * cfg.head_dim:
        raise ValueError(f"VLMConfig.head_dim={cfg.head_dim} is not allowed for qwen2_5_vl: expected "
                         f"hidden_size / num_heads = {cfg.hidden_size // cfg.num_heads} (Qwen2 derives head_dim)")


def build_processor(cfg: VLMConfig, image_size: int = 64) -> Any:
    """A Qwen-VL processor (image + video processors, local tokenizer) for image_size^2 images.

    With `cfg.vision_input_size` 0, min_pixels is one merged patch and max_pixels image_size^2: an image_size x
    image_size image is not resized and becomes `image_tokens(image_size, cfg)` tokens; larger images are scaled
    down to about that many. With a vision_input_size S, min_pixels = max_pixels = S^2: square images are resized
    to S x S (e.g. 64 -> 80 puts a 5 x 5 grid of merged tokens on the image, so that a centred object lies inside
    one token rather than on the corner of four).
    """
    _check_vlm(cfg, image_size)
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
        if cfg.arch == "qwen3_vl":
            from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor as VideoProc
        else:
            from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor as VideoProc
    except ImportError as err:  # transformers' Qwen-VL processors (and vLLM's Qwen-VL models) need torchvision
        raise ImportError(f"building a Qwen-VL processor needs an importable torchvision: {err}") from err
    factor = cfg.vision_patch_size * cfg.spatial_merge_size
    sizes = dict(patch_size=cfg.vision_patch_size, merge_size=cfg.spatial_merge_size, temporal_patch_size=2)
    side = input_side(image_size, cfg)
    image_processor = Qwen2VLImageProcessor(min_pixels=side * side if cfg.vision_input_size else factor * factor,
                                            max_pixels=side * side, **sizes)
    video_processor = VideoProc(size={"shortest_edge": factor * factor, "longest_edge": 4 * image_size * image_size},
                                **sizes)
    tokenizer = build_tokenizer()
    if cfg.arch == "qwen3_vl":
        from transformers import Qwen3VLProcessor as Processor
    else:
        from transformers import Qwen2_5_VLProcessor as Processor
    return Processor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                     chat_template=QWEN_VL_CHAT_TEMPLATE)


def vlm_hf_config(cfg: VLMConfig, tokenizer: Any, image_size: int = 64) -> Any:
    """The transformers config of a tiny VLM of `cfg.arch`, vocabulary matching `tokenizer`."""
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    vision = dict(depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size, num_heads=cfg.vision_num_heads,
                  intermediate_size=VISION_MLP_RATIO * cfg.vision_hidden_size, patch_size=cfg.vision_patch_size,
                  spatial_merge_size=cfg.spatial_merge_size, temporal_patch_size=2, out_hidden_size=cfg.hidden_size)
    text = dict(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=MAX_POSITION_EMBEDDINGS,
                bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    if cfg.arch == "qwen3_vl":
        from transformers import Qwen3VLConfig
        side = input_side(image_size, cfg) // cfg.vision_patch_size  # learned positions: the native patch grid
        vision.update(num_position_embeddings=side * side, deepstack_visual_indexes=[0])
        text.update(head_dim=cfg.head_dim, rope_parameters={
            "rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": mrope_section(cfg.head_dim),
            "mrope_interleaved": True})
        return Qwen3VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)
    from transformers import Qwen2_5_VLConfig
    window = cfg.vision_patch_size * cfg.spatial_merge_size * 4
    vision.update(window_size=window, fullatt_block_indexes=[cfg.vision_depth - 1])
    text.update(rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                                 "mrope_section": mrope_section(cfg.head_dim)})
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)


def scaled_vlm_config(base: VLMConfig, hidden: int = 0, layers: int = 0) -> VLMConfig:
    """`base` widened to `hidden` (head_dim 64, hidden // 64 heads, hidden // 256 key-value heads, a 4x MLP) and
    deepened to `layers`; 0 keeps its own. The larger teachers of the CPU benches (bench/weight_sync.py,
    bench/rollout.py) are built with it."""
    if hidden:
        base = dataclasses.replace(base, hidden_size=hidden, num_heads=max(1, hidden // 64),
                                   num_kv_heads=max(1, hidden // 256), head_dim=64, intermediate_size=4 * hidden)
    return dataclasses.replace(base, num_layers=layers) if layers else base


def build_tiny_vlm(cfg: VLMConfig, out_dir: str | Path, image_size: int = 64) -> Path:
    """Build a tiny seeded VLM of `cfg.arch` with processor + tokenizer, save it under `out_dir`, return it."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    out = Path(out_dir)
    processor = build_processor(cfg, image_size)
    hf_cfg = vlm_hf_config(cfg, processor.tokenizer, image_size)
    model_cls = Qwen3VLForConditionalGeneration if cfg.arch == "qwen3_vl" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(cfg.seed)
    model = model_cls(hf_cfg).to(torch.float32).eval()
    model.generation_config.eos_token_id = hf_cfg.text_config.eos_token_id
    model.generation_config.pad_token_id = hf_cfg.text_config.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def sharpen_score_head(model: Any, score_ids: list[int], scale: float, seed: int = 0) -> None:
    """Give the score-token rows of `lm_head` random directions of norm `scale` (in place).

    A freshly initialised model gives a near-uniform score distribution; this makes it clearly
    input-dependent and non-uniform, for tests and for warm starts.
    """
    head = model.get_output_embeddings().weight
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(len(score_ids), head.shape[1], generator=gen)
    rows = rows / rows.norm(dim=1, keepdim=True) * scale
    with torch.no_grad():
        head[torch.as_tensor(score_ids)] = rows.to(head.dtype)


# ----------------------------------------------------------------------------------------------- Z-Image


def build_tiny_zimage(cfg: GeneratorConfig, out_dir: str | Path, image_size: int = 64) -> Path:
    """Build a tiny seeded Z-Image pipeline, save it with `ZImagePipeline.save_pretrained`, return the dir."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    vae_factor = 2 ** (len(cfg.vae_block_channels) - 1) * 2  # VAE downsampling x the transformer's patch 2
    if image_size % vae_factor:
        raise ValueError(f"image_size={image_size} is not allowed: expected a multiple of {vae_factor} "
                         f"(VAE with {len(cfg.vae_block_channels)} blocks, patch size 2)")
    head_dim = cfg.dim // cfg.num_heads
    axes_t = head_dim // 4 // 2 * 2  # every axis even (rotary pairs), summing to head_dim
    axes_h = (head_dim - axes_t) // 2 // 2 * 2
    axes_dims = [axes_t, axes_h, head_dim - axes_t - axes_h]
    tokenizer = build_tokenizer()
    tokenizer.chat_template = QWEN3_TEXT_CHAT_TEMPLATE  # Z-Image's text encoder is a Qwen3 LM: no default system turn
    torch.manual_seed(cfg.seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=cfg.vae_latent_channels, dim=cfg.dim,
        n_layers=cfg.num_layers, n_refiner_layers=cfg.num_refiner_layers, n_heads=cfg.num_heads,
        n_kv_heads=cfg.num_heads, cap_feat_dim=cfg.text_hidden_size, axes_dims=axes_dims,
        axes_lens=[1024, 512, 512])
    n = len(cfg.vae_block_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.vae_block_channels),
        layers_per_block=cfg.vae_layers_per_block, latent_channels=cfg.vae_latent_channels,
        norm_num_groups=cfg.vae_norm_groups, scaling_factor=1.0, shift_factor=0.0,
        sample_size=image_size)
    heads = max(1, cfg.text_hidden_size // TEXT_ENCODER_HEAD_DIM)
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden_size,
        intermediate_size=TEXT_ENCODER_MLP_RATIO * cfg.text_hidden_size, num_hidden_layers=cfg.text_num_layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=TEXT_ENCODER_HEAD_DIM,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                          transformer=transformer.eval())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------- zoo


def count_parameters(path: str | Path) -> int:
    """Parameters stored in the safetensors files under `path` (recursively), without loading a model."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(path).rglob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                total += math.prod(st.get_slice(key).get_shape())
    return total


_DONE = "zray_built.json"  # written last: a folder without it is rebuilt


@functools.lru_cache(maxsize=1)
def tokenizer_digest() -> str:
    """sha256 of the local tokenizer as built now: its full tokenizers JSON (normalizer, pre-tokenizer, vocabulary,
    merges, added tokens with their ids and flags), eos / pad tokens, and both chat templates. Computed once per
    process (it trains the BPE, about 2 s); any change to the tokenizer's corpus or code changes it."""
    tok = build_tokenizer()
    parts = [tok.backend_tokenizer.to_str(), f"eos={tok.eos_token} pad={tok.pad_token}", QWEN_VL_CHAT_TEMPLATE,
             QWEN3_TEXT_CHAT_TEMPLATE]
    return hashlib.sha256("\n\0".join(parts).encode()).hexdigest()


def build_once(cfg: Any, path: str | Path, builder: Any, image_size: int = 64) -> dict[str, Any]:
    """Build one tiny model with `builder(cfg, path, image_size=)` unless `path` already holds it.

    A config with a `checkpoint` is not built (its path is the checkpoint). A folder is reused only if its
    marker (written last) records the same config, image size and tokenizer (`tokenizer_digest`); otherwise it is
    rebuilt from scratch. A changed tokenizer rebuilds rather than refuses: the folder is this builder's cache
    (seeded, so the rebuild is reproducible), and a model kept beside a new tokenizer would load and then read
    wrong ids (score tokens, image placeholders) without an error. Returns {"path", "num_params", "build_s",
    "built"}.
    """
    import shutil

    if cfg.checkpoint:
        return {"path": cfg.checkpoint, "num_params": None, "build_s": 0.0, "built": False}
    path = Path(path)
    record = {"config": json.loads(json.dumps(dataclasses.asdict(cfg))), "image_size": image_size,
              "tokenizer": tokenizer_digest()}
    marker = path / _DONE
    if marker.exists() and json.loads(marker.read_text()).get("build") == record:
        info = json.loads(marker.read_text())
        return {"path": str(path), "num_params": info["num_params"], "build_s": 0.0, "built": False}
    if path.exists():
        shutil.rmtree(path)
    start = time.perf_counter()
    builder(cfg, path, image_size=image_size)
    build_s = time.perf_counter() - start
    num_params = count_parameters(path)
    write_text_atomic(marker, json.dumps({"build": record, "num_params": num_params, "build_s": build_s}, indent=1))
    return {"path": str(path), "num_params": num_params, "build_s": build_s, "built": True}


def build_zoo(run_cfg: Any, out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Build teacher, student and generator under `out_dir/{teacher,student,generator}` (`build_once` each).

    `run_cfg` is anything with `.teacher`, `.student` (VLMConfig), `.generator` (GeneratorConfig) and
    optionally `.world.image_size`. Returns {role: {"path", "num_params", "build_s", "built"}}.
    """
    image_size = getattr(getattr(run_cfg, "world", None), "image_size", 64)
    builders = {"teacher": build_tiny_vlm, "student": build_tiny_vlm, "generator": build_tiny_zimage}
    return {role: build_once(getattr(run_cfg, role), Path(out_dir) / role, builder, image_size)
            for role, builder in builders.items()}
