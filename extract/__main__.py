"""`python -m extract`: frozen (video-)language-model hidden states -> dff_jax feature shards.

See extract/README.md for supported models, outputs and real-run commands.
"""

from __future__ import annotations

import argparse
import sys

from dff_jax.errors import OneLineArgumentParser
from extract import ExtractError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineArgumentParser(prog="python -m extract", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="hub name, local folder, or a .gguf file (text models)")
    p.add_argument(
        "--items", required=True, help="item list: MicroLens *_title_en.csv, id,title CSV or MovieLens u.item"
    )
    p.add_argument("--items-format", default="auto", help="auto|csv|microlens|movielens")
    p.add_argument("--media", help="folder holding <id>.mp4 (video) or <id>.jpg (cover)")
    p.add_argument("--out", required=True, help="output feature folder")
    p.add_argument("--modality", default="video", help="video|cover|title (paper 6.4.2)")
    p.add_argument("--prompt", default="rec", help="rec|plain (paper Table 3, verbatim) or a custom text")
    p.add_argument("--frames", type=int, default=16, help="frames sampled uniformly over each clip (paper: 16)")
    p.add_argument("--pool", default=None, help="video_mean|last|all_mean (default video_mean; all_mean for title)")
    p.add_argument("--dtype", default="bfloat16", help="storage dtype: bfloat16|float16|float32")
    p.add_argument("--model-dtype", default="auto", help="compute dtype (auto: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--shard", default="0/1", help="I/N: this process extracts every N-th item from the I-th")
    p.add_argument("--device", default=None, help="cpu|cuda|cuda:K (default: cuda when available)")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="run code shipped with the checkpoint (off by default)"
    )
    p.add_argument("--adapter", default=None, help="minicpmv or package.module:Class (see extract/adapters.py)")
    p.add_argument("--flush-every", type=int, default=256, help="items per shard file (a kill loses at most these)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="pixels per frame (or cover) for Qwen-VL processors (default: the family's budget, extract/README.md)",
    )
    p.add_argument(
        "--attn-implementation", default=None, help="sdpa|eager|flash_attention_2|... (default: the model's)"
    )
    p.add_argument(
        "--captions", action="store_true", help="caption-centric features (paper 4.2) instead of hidden states"
    )
    p.add_argument("--caption-source", default="generate", help="generate (the model writes one paragraph) | title")
    p.add_argument("--caption-tokens", type=int, default=128, help="max new tokens per caption")
    p.add_argument("--text-encoder", default=None, help="sentence encoder for --captions (mean pooling)")
    p.add_argument(
        "--decode-workers", type=int, default=2, help="threads decoding + preprocessing media ahead of the model"
    )
    p.add_argument("--prefetch", type=int, default=None, help="batches prepared ahead (default 2 x decode workers)")
    p.add_argument(
        "--decode-scale",
        type=float,
        default=1.0,
        help="shrink frames while decoding to at most this x (per side) the processor's frame size; 1: straight to "
        "the processor's size where it allows (Qwen-VL), so it does not resize again; 0: full size",
    )
    p.add_argument(
        "--video-decoder",
        default="cpu",
        help="cpu (FFmpeg's software decoders) or a hardware device type of PyAV's FFmpeg, e.g. cuda (NVDEC: "
        "the same frames, decoded on the GPU, extract/README.md)",
    )
    p.add_argument(
        "--allow-failures",
        action="store_true",
        help="finalise the folder although some items failed (no record for them; listed in manifest.json)",
    )
    p.add_argument(
        "--max-consecutive-failures",
        type=int,
        default=20,
        metavar="K",
        help="stop when K items in a row fail (a problem of the run, not of the items); 0: no limit",
    )
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from dff_jax.errors import one_line
        from dff_jax.records import RecordError
        from extract.items import parse_shard
        from extract.run import RunOptions, env_threads, run

        env_threads()
        opts = RunOptions(
            items=args.items,
            out=args.out,
            model=args.model,
            media=args.media,
            modality=args.modality,
            prompt=args.prompt,
            frames=args.frames,
            pool=args.pool,
            dtype=args.dtype,
            compute_dtype=args.model_dtype,
            batch_size=args.batch_size,
            shard=parse_shard(args.shard),
            device=args.device,
            trust_remote_code=args.trust_remote_code,
            adapter=args.adapter,
            items_format=args.items_format,
            flush_every=args.flush_every,
            max_pixels=args.max_pixels,
            captions=args.captions,
            caption_source=args.caption_source,
            caption_tokens=args.caption_tokens,
            text_encoder=args.text_encoder,
            decode_workers=args.decode_workers,
            prefetch=args.prefetch,
            attn_implementation=args.attn_implementation,
            decode_scale=args.decode_scale,
            video_decoder=args.video_decoder,
            progress=not args.no_progress,
            allow_failures=args.allow_failures,
            max_consecutive_failures=args.max_consecutive_failures,
        )
        manifest = run(opts)
    except (ExtractError, RecordError) as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)  # hub messages span lines
        return 2
    except OSError as e:  # disk full, read-only or vanished output folder, permission denied
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished items are saved; rerun the same command to resume", file=sys.stderr)
        return 130
    blocked = manifest.get("folder_failures") or manifest.get("folder_empty")
    state = (
        "complete"
        if manifest["folder_complete"]
        else "not finalised (no item written)"
        if manifest.get("folder_empty")
        else "not finalised (failed items)"
        if blocked
        else "incomplete (other shards pending)"
    )
    print(
        f"shard {manifest['shard'][0]}/{manifest['shard'][1]}: {manifest['extracted']} extracted, "
        f"{manifest['failed']} failed, {manifest['already_done']} already done, "
        f"{manifest['seconds']:.1f} s ({manifest['items_per_second'] or 0:.2f} items/s); "
        f"folder {state}"
    )
    if blocked:
        print(f"error: {blocked}", file=sys.stderr)
        return 2
    if manifest["failed"] and not manifest["folder_complete"] and not args.allow_failures:
        print(
            f"warning: {manifest['failed']} item(s) of this shard failed (failures-part-*.jsonl in {args.out}); "
            "the folder will not be finalised with them unless --allow-failures is given",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
