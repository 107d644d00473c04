"""Throughput of the hidden-state pass at a real model's *shape*, without its weights; and of the CPU side.

`python -m extract.bench --shape qwen2_5_vl_7b --device cuda --batch-sizes 1,4,8` builds Qwen2.5-VL-7B's
architecture with random bf16 weights directly on the device (compute cost is the same as the real
checkpoint's), feeds synthetic 16-frame clips through the same `VisionLanguageBackend` code a run uses
(processor, forward with all hidden states, pooling), and prints items/s per batch size as JSON.
Decoding is excluded there; it runs in the decode workers in a run, and `--pipeline` measures it:

`python -m extract.bench --pipeline --gops 8,30,250 --codecs libx265,libx264` synthesises 10 s, 30 fps 1080p clips
with PyAV (default: HEVC where its FFmpeg has libx265, H.264 otherwise; `--files` measures your own), then per
clip decodes 16 uniformly sampled frames and preprocesses them with the Qwen2.5-VL processor at the run's default
token budget, three ways in turn (`PIPELINE_PATHS`: every frame decoded at full size, the way the extractor
started; seek with frames shrunk to 2x the processor's size, `--decode-scale 2`; seek straight to the processor's
size, the default), on one core (one FFmpeg thread, one torch thread). It prints CPU seconds per item
(`time.process_time`, best of `--repeats` alternating rounds) split into index / decode / convert / preprocess,
the frames decoded, and how far each path's processor output is from the full-decode path's (0-255 pixel units).
`--video-decoder cuda` adds a fourth path, the default one decoded by NVDEC, with whether its frames are
bit-identical to the CPU's (its CPU seconds include the driver's threads: `process_time` counts the whole process).

`python -m extract.bench --damage 20 --size 360x640 --clip-seconds 4` measures the damaged-stream check of
`video.read_clip` (extract/README.md, Failed items): per codec, 20 copies of one clip with random bytes written
into packets, counted as refused (MediaError), decoded to the intact frames, or decoded to different frames.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from dff_jax.errors import OneLineArgumentParser
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
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        video_processor=Qwen2VLVideoProcessor(),
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
    # The run's default token budget applies (or --max-pixels per frame), as in `python -m extract`.
    return VisionLanguageBackend.from_parts(
        model, processor, modality="video", prompt=PROMPTS["rec"], device=device, max_pixels=max_pixels
    )


def synthetic_clip(frames: int, height: int, width: int, seed: int) -> Clip:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 255, size=(frames, height, width, 3), dtype=np.uint8)
    fps = 30.0
    idx = list(range(0, frames * 20, 20))
    return Clip(data, [i / fps for i in idx], fps, idx, idx[-1] + 1, (idx[-1] + 1) / fps)


def moving_frames(num_frames: int, height: int, width: int, seed: int = 0):
    """Frames of a blocky random texture panning 4 px a frame: cheap to make at 1080p, real motion for a codec."""
    rng = np.random.default_rng(seed)
    tex = rng.integers(0, 256, size=(height // 8 + 1, (width + 4 * num_frames) // 8 + 1, 3), dtype=np.uint8)
    tex = np.repeat(np.repeat(tex, 8, axis=0), 8, axis=1)[:height]
    for t in range(num_frames):
        yield tex[:, 4 * t : 4 * t + width]


def synth_clip(path, seconds: float, fps: int, height: int, width: int, gop: int, seed: int, codec: str):
    """Writes one synthetic clip (ultrafast x265, or x264's defaults); returns (path, codec name)."""
    from extract.video import write_test_video

    options = {"preset": "ultrafast", "x265-params": "log-level=error"} if codec == "libx265" else {}
    n = int(seconds * fps)
    write_test_video(path, moving_frames(n, height, width, seed), fps=fps, codec=codec, gop=gop, options=options)
    return path, codec


def _cpu(fn):
    t = time.process_time()
    out = fn()
    return out, time.process_time() - t


# The decode paths measured side by side: the one the extractor used first, the seek path with frames shrunk to
# twice the processor's size per side (--decode-scale 2), and the run's default (--decode-scale 1).
PIPELINE_PATHS = {
    "full": "every frame decoded, full-size RGB, the processor resizes",
    "seek_x2": "seek + reference frames only, frames shrunk to 2x the processor's size per side while decoding",
    "seek": "seek + reference frames only, frames converted straight to the processor's size (the default)",
    "seek_hw": "the default path decoded by --video-decoder (e.g. cuda: NVDEC); only the sampled frames leave the GPU",
}


def _pixel_diff(x, ref, std) -> dict:
    """|difference| of two processor outputs in 0-255 pixel units (pixel_values are (x / 255 - mean) / std)."""
    if x.shape != ref.shape:
        return {"mean": None, "max": None}
    d = (x - ref).abs().reshape(x.shape[0], 3, -1) * torch.tensor(std)[None, :, None] * 255
    return {"mean": round(float(d.mean()), 2), "max": round(float(d.max()), 1)}


def pipeline(args) -> dict:
    """Decode + preprocess CPU seconds per item on one core, side by side per path (see the module docstring)."""
    import os
    import tempfile
    from pathlib import Path

    import av

    from extract.video import DecoderError, read_clip, unknown_decoder

    torch.set_num_threads(1)
    h, w = args.size
    be = build_backend("tiny", "cpu", None)  # the real processor classes at the run's default budget
    std = be.processor.video_processor.image_std
    t = time.process_time()
    be.frame_size(h, w, args.frames)  # asked once per frame size in a run, then cached: not part of an item
    probe_s = time.process_time() - t
    codecs = args.codecs.split(",") if args.codecs else ["libx265" if "libx265" in av.codecs_available else "libx264"]
    for codec in codecs:
        if codec not in av.codecs_available:
            raise SystemExit(f"error: --codecs: this PyAV's FFmpeg has no {codec} encoder")
    result = {"mode": "pipeline", "size": [h, w], "frames": args.frames, "seconds_per_clip": args.clip_seconds}
    sizing = {
        "full": {"method": "full"},
        "seek_x2": {"max_pixels": int(be.frame_pixels * 4)},
        "seek": {"max_pixels": be.frame_pixels, "size": be.frame_size},
    }
    if args.video_decoder != "cpu":
        if problem := unknown_decoder(args.video_decoder):
            raise SystemExit(f"error: {problem}")
        sizing["seek_hw"] = {**sizing["seek"], "decoder": args.video_decoder}
    paths = {k: v for k, v in PIPELINE_PATHS.items() if k in sizing}
    result.update(cpu=platform_cpu(), paths=paths, size_probe_s=round(probe_s, 3), video_decoder=args.video_decoder)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.files:  # the user's own clips (e.g. MicroLens mp4 files) instead of synthetic ones
            jobs = [("file", c, lambda p=p: (Path(p), "file")) for c, p in enumerate(args.files.split(","))]
        else:
            jobs = [
                (
                    gop,
                    c,
                    lambda gop=gop, c=c, codec=codec: synth_clip(
                        Path(tmp) / f"{codec}-g{gop}-{c}.mp4", args.clip_seconds, 30, h, w, gop, c, codec
                    ),
                )
                for codec in codecs
                for gop in args.gops
                for c in range(args.clips)
            ]
        for gop, c, make in jobs:
            path, codec = make()
            if not path.is_file():
                raise SystemExit(f"error: --files: {path}: no such file")
            row = {"gop": gop, "clip": c, "codec": codec, "mbytes": round(os.path.getsize(path) / 1e6, 2)}
            if gop == "file":
                row["path"] = str(path)
            ref, cpu_frames = None, None
            # The paths take turns, `--repeats` rounds; each keeps its best round (CPU time only grows under load).
            for _ in range(max(args.repeats, 1)):
                for name, kw in sizing.items():
                    try:
                        clip, dt = _cpu(lambda kw=kw, path=path: read_clip(path, args.frames, threads=1, **kw))
                    except DecoderError as e:
                        raise SystemExit(f"error: --video-decoder {args.video_decoder}: {e}") from None
                    cpu_frames = clip.frames if name == "seek" else cpu_frames
                    sample = Sample(Item(str(c), "", ""), clip=clip)
                    prepared, pt = _cpu(lambda sample=sample: be.prepare([sample]))
                    if name in row and row[name]["total_s"] <= dt + pt:
                        continue
                    pixels = prepared.groups[0][1]["pixel_values_videos"]
                    ref = pixels if ref is None else ref
                    row[name] = {
                        **{f"{k}_s": round(v, 3) for k, v in clip.cpu_seconds.items()},
                        "read_s": round(dt, 3),
                        "preprocess_s": round(pt, 3),
                        "total_s": round(dt + pt, 3),
                        "decoded_frames": clip.decoded_frames,
                        "method": clip.method,
                        "frame_size": list(clip.frames.shape[1:3]),
                        "visual_tokens": prepared.visual_tokens[0],
                        "pixel_diff_vs_full": _pixel_diff(pixels, ref, std),
                    }
                    if name == "seek_hw":
                        row[name]["decoder"] = clip.decoder
                        row[name]["decoder_fallback"] = clip.decoder_fallback
                        row[name]["frames_identical_to_seek"] = bool(np.array_equal(clip.frames, cpu_frames))
            rows.append(row)
            print(json.dumps(row), flush=True)
    keys = ("index_s", "decode_s", "convert_s", "preprocess_s", "total_s", "decoded_frames")
    for codec, gop in sorted({(r["codec"], r["gop"]) for r in rows}, key=str):
        mine = [r for r in rows if r["gop"] == gop and r["codec"] == codec]
        result.setdefault("mean_cpu_seconds_per_item", {})[f"{codec}-gop{gop}"] = {
            m: {k: round(float(np.mean([r[m][k] for r in mine])), 3) for k in keys} for m in sizing
        }
    return result


def av_codecs() -> set:
    import av

    return set(av.codecs_available)


def damage(args) -> dict:
    """How often read_clip refuses a damaged stream: per codec, `--damage N` copies of one clip, each with 8 random
    bytes written into 3 random non-key packets, decoded and compared with the intact clip's frames."""
    import tempfile

    import av

    from extract.video import MediaError, read_clip

    h, w = args.size
    result = {"trials": args.damage, "size": [h, w], "clip_seconds": args.clip_seconds, "codecs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        default = ",".join(c for c in ("libx265", "libx264") if c in av_codecs())
        for codec in (args.codecs or default).split(","):
            path, _ = synth_clip(Path(tmp) / f"{codec}.mp4", args.clip_seconds, 30, h, w, args.gops[0], 0, codec)
            intact = read_clip(path, args.frames).frames
            with av.open(str(path)) as container:
                packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size > 16 and not p.is_keyframe]
            counts = {"refused": 0, "identical": 0, "different": 0}
            first_reason = None
            for trial in range(args.damage):
                rng = np.random.default_rng(trial)
                data = bytearray(path.read_bytes())
                for i in rng.choice(len(packets), min(3, len(packets)), replace=False):
                    pos, size = packets[i]
                    at = pos + int(rng.integers(8, size - 8))
                    data[at : at + 8] = rng.bytes(8)
                damaged = Path(tmp) / "damaged.mp4"
                damaged.write_bytes(bytes(data))
                try:
                    frames = read_clip(damaged, args.frames).frames
                except MediaError as e:
                    counts["refused"] += 1
                    first_reason = first_reason or str(e).replace(str(damaged), "<clip>")
                    continue
                same = frames.shape == intact.shape and np.array_equal(frames, intact)
                counts["identical" if same else "different"] += 1
            result["codecs"][codec] = {**counts, "first_reason": first_reason}
            print(json.dumps({"codec": codec, **counts}), flush=True)
    return result


def _positive_ints(parser, flag: str, text: str, sep: str = ",") -> list[int]:
    try:
        values = [int(v) for v in text.split(sep)]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        parser.error(f"{flag} {text!r}: expected integers >= 1 separated by {sep!r}")
    return values


def platform_cpu() -> str:
    import platform

    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> None:
    p = OneLineArgumentParser(prog="python -m extract.bench", description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen2_5_vl_7b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument(
        "--size",
        default=None,
        help="HxW of the synthetic frames (default 240x320; --pipeline 1080x1920; --damage 360x640)",
    )
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (--pipeline: alternating, best kept)")
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--pipeline", action="store_true", help="CPU side only: decode + preprocess of 1080p clips")
    p.add_argument("--gops", default="30,250", help="--pipeline: keyframe intervals of the synthetic clips")
    p.add_argument("--clips", type=int, default=2, help="--pipeline: clips per keyframe interval")
    p.add_argument("--files", default=None, help="--pipeline: comma-separated mp4 files to measure instead")
    p.add_argument("--clip-seconds", type=float, default=10.0, help="--pipeline: length of each clip (30 fps)")
    p.add_argument("--codecs", default=None, help="--pipeline: encoders, e.g. libx265,libx264 (default: HEVC if any)")
    p.add_argument("--video-decoder", default="cpu", help="--pipeline: also measure this hardware decoder (cuda)")
    p.add_argument("--damage", type=int, default=0, help="N: damaged-stream detection over N damaged copies per codec")
    args = p.parse_args(argv)
    if args.damage < 0:
        p.error(f"--damage {args.damage}: expected an integer >= 0")
    for name in ("frames", "repeats", "clips"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: expected an integer >= 1")
    if not 0 < args.clip_seconds < 3600:  # inf: an OverflowError traceback
        p.error(f"--clip-seconds {args.clip_seconds}: expected a positive number of seconds below 3600")
    if args.pipeline and args.damage:
        p.error("--pipeline and --damage measure different things; give one")
    if args.files and not args.pipeline:
        p.error("--files is read by --pipeline only")
    for codec in args.codecs.split(",") if args.codecs else ():
        if codec not in av_codecs():
            p.error(f"--codecs: this PyAV's FFmpeg has no {codec} encoder")
    args.gops, args.batch_sizes = (
        _positive_ints(p, "--gops", args.gops),
        _positive_ints(p, "--batch-sizes", args.batch_sizes),
    )
    if args.size is None:  # an explicit 240x320 with --pipeline was replaced by this default
        args.size = "1080x1920" if args.pipeline else "360x640" if args.damage else "240x320"
    size = _positive_ints(p, "--size", args.size, sep="x")
    if len(size) != 2:
        p.error(f"--size {args.size!r}: expected HxW, e.g. 1080x1920")
    args.size = tuple(size)
    if not args.pipeline and not args.damage and args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here (--pipeline measures the CPU side; --device cpu runs it)")
    from extract.video import MediaError

    try:
        if args.pipeline:
            print(json.dumps(pipeline(args), indent=1))
            return
        if args.damage:
            print(json.dumps(damage(args), indent=1))
            return
    except MediaError as e:  # a --files entry that is not a video
        p.error(str(e))
    h, w = args.size
    t0 = time.time()
    be = build_backend(args.shape, args.device, args.max_pixels)
    weights = torch.cuda.memory_allocated() if args.device.startswith("cuda") else 0
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
    result["video_tokens"] = be.prepare([one]).visual_tokens[0]
    result["weights_gib"] = round(weights / 2**30, 2)
    for bs in args.batch_sizes:
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
            peak = torch.cuda.max_memory_allocated()
            entry["peak_gib"] = round(peak / 2**30, 2)
            # Activations per item: the peak above the weights, shared out over the batch.
            entry["peak_gib_per_item"] = round((peak - weights) / bs / 2**30, 3)
        result.setdefault("runs", []).append(entry)
        print(json.dumps(entry), flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
