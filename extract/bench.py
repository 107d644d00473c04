"""Throughput of the hidden-state pass at a real model's *shape*, without its weights.

`python -m extract.bench --shape qwen2_5_vl_7b --device cuda --batch-sizes 1,4,8` builds Qwen2.5-VL-7B's
architecture with random bf16 weights directly on the device (compute cost is the same as the real
checkpoint's), feeds synthetic 16-frame clips through the same `VisionLanguageBackend` code a run uses
(processor, forward with all hidden states, pooling), and prints items/s per batch size as JSON.
Decoding is excluded (measure it with `extract.video.read_clip`); it runs in parallel threads in a run.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from extract.items import Item
from extract.models import PROMPTS, Sample, VisionLanguageBackend
from extract.video import Clip

# Qwen-family special tokens and a chat template covering text, image and video parts. The extractor tests build
# their tiny checkpoints from the same definitions (tests/extract_tiny.py).
QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_EXTRA_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}
QWEN_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Published config.json values of Qwen/Qwen2.5-VL-7B-Instruct (text and vision towers).
SHAPES = {
    "qwen2_5_vl_7b": dict(
        text=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            max_position_embeddings=128000,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            fullatt_block_indexes=[7, 15, 23, 31],
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
    ),
    # A few-MB stand-in with the same code path, for checking the benchmark on a CPU.
    "tiny": dict(
        text=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=700,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 2]},
        ),
        vision=dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[0]
        ),
    ),
}


def train_tokenizer(special: list[str], extra: dict, corpus: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on the spot (no download) with a family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=extra
    )


def build_backend(shape: str, device: str, max_pixels: int | None) -> VisionLanguageBackend:
    """A VisionLanguageBackend around a random-weight model of the named shape (no download)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    spec = SHAPES[shape]
    tokenizer = train_tokenizer(QWEN_SPECIAL, QWEN_EXTRA_TOKENS, [PROMPTS["rec"]] * 20, 600)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    video_kw = {"max_pixels": max_pixels} if max_pixels else {}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        video_processor=Qwen2VLVideoProcessor(**video_kw),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT,
    )
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            spec["text"],
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=spec["vision"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        torch.set_default_dtype(torch.bfloat16)
        model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
        torch.set_default_dtype(torch.float32)
    return VisionLanguageBackend.from_parts(model, processor, modality="video", prompt=PROMPTS["rec"], device=device)


def synthetic_clip(frames: int, height: int, width: int, seed: int) -> Clip:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 255, size=(frames, height, width, 3), dtype=np.uint8)
    fps = 30.0
    idx = list(range(0, frames * 20, 20))
    return Clip(data, [i / fps for i in idx], fps, idx, idx[-1] + 1, (idx[-1] + 1) / fps)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m extract.bench", description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen2_5_vl_7b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", default="240x320", help="HxW of the synthetic frames")
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-pixels", type=int, default=None)
    args = p.parse_args(argv)
    h, w = (int(x) for x in args.size.split("x"))
    t0 = time.time()
    be = build_backend(args.shape, args.device, args.max_pixels)
    result = {
        "shape": args.shape,
        "device": args.device,
        "frames": args.frames,
        "size": [h, w],
        "build_seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
    }
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    one = Sample(Item("0", "", ""), clip=synthetic_clip(args.frames, h, w, 0))
    result["video_tokens"] = int((be.inputs([one])["input_ids"] == be.model.config.video_token_id).sum())
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        samples = [Sample(Item(str(i), "", ""), clip=synthetic_clip(args.frames, h, w, i)) for i in range(bs)]
        be.hidden_states(samples, "video_mean")  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.time()
        for _ in range(args.repeats):
            out = be.hidden_states(samples, "video_mean")
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = (time.time() - t) / args.repeats
        entry = {
            "batch": bs,
            "seconds_per_batch": round(dt, 3),
            "items_per_second": round(bs / dt, 2),
            "out_shape": list(out.shape),
        }
        if args.device.startswith("cuda"):
            entry["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        result.setdefault("runs", []).append(entry)
        print(json.dumps(entry), flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
