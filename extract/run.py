"""One extraction run: item list -> decoded media -> model -> pooled states -> record shards.

Layout of an output folder (all names fixed, so N hosts can share one folder):

* `run_config.json`   what is being extracted (model, modality, prompt, pooling, storage and compute dtype,
                      frames, torch/transformers versions, the processor's size settings, decode scale);
                      written by the first run once its model is loaded, and every later run (resume,
                      other shards, other hosts) must match it;
* `part-IIIII-of-NNNNN-SSSSSS.tfrecord`  finished shards of shard I of N, `flush_every` items each,
                      written atomically by `dff_jax.records.ShardWriter` (a kill loses only the open part);
* `failures-part-IIIII-of-NNNNN.jsonl`, `manifest-part-IIIII-of-NNNNN.json`  per shard;
* `captions-part-IIIII-of-NNNNN.jsonl`  with `--captions`;
* `lock-part-IIIII-of-NNNNN`  while a process extracts shard I of N (`extract/lock.py`);
* `schema.json`, `manifest.json`, `failures.jsonl` (`captions.jsonl`)  written by `extract.merge.finalize`
  once every item is written (or failed, with `allow_failures`).

Failures: a media problem (unreadable, empty, missing file) or an exception of the model on one item is
recorded in the shard's failures file and the run goes on, until `max_consecutive_failures` items in a row
have failed (then it stops: a problem hitting every item is not a per-item failure). A device or runtime
failure (CUDA error, out of memory, MemoryError) stops the run at once with the batch's items named; the
finished items are flushed first, so a rerun resumes.

Resume: the ids in every finished shard (of any shard index) are skipped, so no item is written twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import signal
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dff_jax import records
from extract import ExtractError, __version__
from extract.items import Item, read_items, select_shard
from extract.lock import ShardLock, live_holder
from extract.merge import (
    LATER_KEYS,
    PER_HOST_KEYS,
    RUN_CONFIG,
    attest,
    check_attested,
    check_item_texts,
    check_known_ids,
    check_run_config_object,
    create_exclusive,
    drop_torn_tail,
    failures_message,
    finalize,
    nothing_written_message,
    read_attested,
    reads_texts,
    scan_shards,
)
from extract.video import CPU_DECODER, DecoderError, MediaError, read_clip, read_image, unknown_decoder


@dataclasses.dataclass
class RunOptions:
    """Everything one run needs; the command line (`extract/__main__.py`) fills it."""

    items: str
    out: str
    model: str | None = None
    media: str | None = None
    modality: str = "video"
    prompt: str = "rec"
    frames: int = 16
    pool: str | None = None  # None: video_mean for video/cover, all_mean for title
    dtype: str = "bfloat16"
    compute_dtype: str = "auto"
    batch_size: int = 1
    shard: tuple[int, int] = (0, 1)
    device: str | None = None
    trust_remote_code: bool = False
    adapter: str | None = None
    items_format: str = "auto"
    flush_every: int = 256
    max_pixels: int | None = None
    captions: bool = False
    caption_source: str = "generate"
    caption_tokens: int = 128
    text_encoder: str | None = None
    decode_workers: int = 2
    prefetch: int | None = None  # batches decoded + preprocessed ahead of the model (None: 2 x decode_workers)
    attn_implementation: str | None = None
    decode_scale: float = 1.0  # frames are shrunk while decoding to this x (per side) the processor's size (see --help)
    video_decoder: str = CPU_DECODER  # or a hardware device type of PyAV's FFmpeg ("cuda": NVDEC), see --help
    progress: bool = True
    allow_failures: bool = False  # finalise the folder although items failed (listed in manifest.json)
    max_consecutive_failures: int = 20  # stop when this many items in a row fail (0: never)


# --frames above this is a typo, not a sampling rate: the paper samples 16, and the preflight asks the processor
# about a 1080p clip of that many frames (~6 MB a frame).
MAX_FRAMES = 1024
# --decode-scale above this decodes more pixels than any processor keeps (16^2 x its frame size): full size is 0.
MAX_DECODE_SCALE = 16.0


def _prefix(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


def _versions() -> dict:
    import av
    import torch
    import transformers

    return {
        "extract": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "av": av.__version__,
        "python": platform.python_version(),
    }


def resolve_options(opts: RunOptions) -> RunOptions:
    """Fills defaults and validates combinations; raises ExtractError with one clear message."""
    from extract.models import MODALITIES, POOLINGS

    if opts.modality not in MODALITIES:
        raise ExtractError(f"unknown --modality {opts.modality!r}; expected one of {MODALITIES}")
    if opts.pool is None:
        opts.pool = "all_mean" if opts.modality == "title" else "video_mean"
    if opts.pool not in POOLINGS:
        raise ExtractError(f"unknown --pool {opts.pool!r}; expected one of {POOLINGS}")
    if opts.pool == "video_mean" and opts.modality == "title" and not opts.captions:
        raise ExtractError("--pool video_mean needs visual tokens; use --pool all_mean or last with --modality title")
    if opts.dtype not in records.DTYPES:
        raise ExtractError(f"unknown --dtype {opts.dtype!r}; expected one of {records.DTYPES}")
    if opts.compute_dtype not in ("auto",) + records.DTYPES:
        raise ExtractError(f"unknown --model-dtype {opts.compute_dtype!r}")
    if opts.batch_size < 1 or opts.frames < 1 or opts.flush_every < 1 or opts.decode_workers < 1:
        raise ExtractError("--batch-size, --frames, --flush-every and --decode-workers must be >= 1")
    if opts.frames > MAX_FRAMES:
        raise ExtractError(f"--frames {opts.frames}: expected at most {MAX_FRAMES} frames per clip (the paper uses 16)")
    if opts.max_consecutive_failures < 0:
        raise ExtractError(
            f"--max-consecutive-failures must be >= 0 (0: no limit), not {opts.max_consecutive_failures}"
        )
    if opts.max_pixels is not None and opts.max_pixels < 1:
        raise ExtractError(f"--max-pixels must be >= 1 (pixels per frame), not {opts.max_pixels}")
    if opts.prefetch is None:
        opts.prefetch = 2 * opts.decode_workers
    if opts.prefetch < 1:
        raise ExtractError("--prefetch must be >= 1")
    scale = opts.decode_scale
    # `nan < 1` is False: finiteness first, or NaN would reach int() after the model has loaded.
    if not math.isfinite(scale) or scale < 0 or (scale and not 1 <= scale <= MAX_DECODE_SCALE):
        raise ExtractError(
            f"--decode-scale {scale}: expected 0 (full size) or a finite number from 1 to {MAX_DECODE_SCALE:g} "
            "(frames are never shrunk below the processor's size)"
        )
    if opts.attn_implementation not in (
        None,
        "eager",
        "sdpa",
        "flash_attention_2",
        "flash_attention_3",
        "flex_attention",
    ):
        raise ExtractError(
            f"unknown --attn-implementation {opts.attn_implementation!r}; expected eager, sdpa, flash_attention_2, "
            "flash_attention_3 or flex_attention"
        )
    if problem := unknown_decoder(opts.video_decoder):
        raise ExtractError(problem)
    if uses_media(opts) and not opts.media:
        raise ExtractError(f"--modality {opts.modality} needs --media DIR holding <id>.mp4 / <id>.jpg")
    if opts.media and not Path(opts.media).is_dir():
        raise ExtractError(f"--media {opts.media}: not a folder")
    if opts.captions:
        if not opts.text_encoder:
            raise ExtractError("--captions needs --text-encoder NAME_OR_PATH")
        if opts.caption_source not in ("generate", "title"):
            raise ExtractError(f"unknown --caption-source {opts.caption_source!r}; expected generate or title")
        if opts.caption_source == "generate" and opts.caption_tokens < 1:
            # Refused up front: it would fail every item and then be frozen into the folder's run_config.json.
            raise ExtractError(f"--caption-tokens must be >= 1, not {opts.caption_tokens}")
        if opts.caption_source == "title":
            # The features are the titles' embeddings: schema.json says modality "title", no frames, no VLM
            # (it said "video" with --frames, and recorded a --model that is never loaded).
            if opts.model:
                print(f"note: --model {opts.model} is not used: --caption-source title embeds the titles directly")
            opts.modality, opts.model = "title", None
    if not opts.model and not (opts.captions and opts.caption_source == "title"):
        raise ExtractError("--model is required (only --captions --caption-source title runs without one)")
    import torch

    if opts.device is None:
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(opts.device)
    except (RuntimeError, ValueError):
        raise ExtractError(f"--device {opts.device!r}: not a torch device; expected cpu, cuda or cuda:N") from None
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise ExtractError(f"--device {opts.device}: torch sees no CUDA device here (use --device cpu)")
    return opts


def run_config(opts: RunOptions) -> dict:
    """The identity of a feature set: what every run into the same folder must agree on."""
    from extract.models import resolve_prompt

    prompt_name, prompt_text = resolve_prompt(opts.prompt)
    if opts.captions and opts.caption_source == "title":
        prompt_name, prompt_text = "none", ""  # the item text itself is embedded; no model is prompted
    import torch
    import transformers

    from extract.models import _torch_dtype

    cfg = {
        "model": opts.model,
        "adapter": opts.adapter,
        "modality": opts.modality,
        "prompt_name": prompt_name,
        "prompt_text": prompt_text,
        "pool": opts.pool,
        "dtype": opts.dtype,
        "num_frames": opts.frames if opts.modality == "video" else (1 if opts.modality == "cover" else 0),
        "max_pixels": opts.max_pixels,
        # Same inputs, different numbers: the compute dtype, the library versions and (after loading) the
        # processor's size settings decide the features as much as the model does.
        "compute_dtype": str(_torch_dtype(opts.compute_dtype, opts.device)).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "decode_scale": opts.decode_scale if opts.modality == "video" else None,
        "captions": opts.captions,
        "items": str(Path(opts.items).resolve()),
        "items_format": opts.items_format,
    }
    if opts.captions:
        cfg.update(
            caption_source=opts.caption_source,
            caption_tokens=opts.caption_tokens,
            text_encoder=opts.text_encoder,
            schema_model=opts.text_encoder,
            schema_pooling="caption_mean",
            schema_extra={"caption_model": opts.model, "caption_source": opts.caption_source, "paradigm": "caption"},
        )
    else:
        cfg.update(schema_model=opts.model, schema_pooling=opts.pool, schema_extra={"paradigm": "hidden_state"})
    return cfg


def _check_run_config(out: Path, cfg: dict, write: bool) -> None:
    """Refuses a folder holding another extraction; `write`: record `cfg` as the folder's identity if new.

    Called twice: before the model is loaded (what the options decide) and after (the processor settings).
    """
    path = out / RUN_CONFIG
    if not path.exists() and (not write or create_exclusive(path, cfg)):
        return
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExtractError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    check_run_config_object(path, old)
    # A key added to the identity later is compared only with folders that recorded it.
    keys = [k for k in cfg if k not in PER_HOST_KEYS and (k in old or k not in LATER_KEYS)]
    diff = {k: (old.get(k), cfg[k]) for k in keys if old.get(k) != cfg[k]}
    if diff:
        lines = ", ".join(f"{k}: {a!r} there vs {b!r} now" for k, (a, b) in diff.items())
        empty = "" if records.shard_files(out) else " (it holds no features yet: delete it to start over)"
        raise ExtractError(f"{path}: this folder holds a different extraction ({lines}); use another --out{empty}")
    if write and any(k not in old for k in cfg):
        records.write_json_atomic(path, {**old, **cfg})  # the first run after loading adds the processor settings


def uses_media(opts: RunOptions) -> bool:
    """Whether the run reads each item's media file (video, cover) rather than its text (title, title captions)."""
    return not reads_texts(vars(opts))


def check_texts(items: list[Item], opts: RunOptions) -> None:
    """Refuses items whose text a model would read (title modality, title captions) but that have none: an empty
    title gives every such item the same constant vector, which is not a feature of the item."""
    if uses_media(opts):
        return
    empty = [it for it in items if not it.text.strip()]
    if empty:
        shown = ", ".join(f"{it.item_id!r} (line {it.line})" for it in empty[:5])
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        raise ExtractError(f"{opts.items}: {len(empty)} item(s) have an empty title: {shown}{more}")


def check_media_names(items: list[Item], opts: RunOptions) -> None:
    """Ids name the media files (`<id>.mp4`): a separator or '.'/'..' would read a file outside --media."""
    if not uses_media(opts):
        return
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    try:
        name_max = os.pathconf(opts.media, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such folder (refused later) or no pathconf
        name_max = 255
    for it in items:
        if it.item_id in (".", "..") or any(c in it.item_id for c in seps):
            raise ExtractError(
                f"{opts.items}: line {it.line}: item id {it.item_id!r} cannot name a file in --media "
                "(a path separator, '.' or '..')"
            )
        # Else opening it raises ENAMETOOLONG, which would stop every run at this item.
        if len(os.fsencode(it.item_id)) + len(".mp4") > name_max:
            raise ExtractError(
                f"{opts.items}: line {it.line}: item id {it.item_id[:40]!r}... ({len(os.fsencode(it.item_id))} "
                f"bytes) cannot name a file in --media: <id>.mp4 exceeds the file system's {name_max}-byte name limit"
            )


def build_backend(opts: RunOptions):
    """The model side of a run: an adapter, the text path or the generic vision-language path."""
    from extract import adapters
    from extract.models import TextBackend, VisionLanguageBackend, is_causal_lm, resolve_prompt

    _, prompt = resolve_prompt(opts.prompt)
    kw = dict(
        prompt=prompt, device=opts.device, compute_dtype=opts.compute_dtype, trust_remote_code=opts.trust_remote_code
    )
    adapter = opts.adapter or adapters.detect(opts.model, opts.trust_remote_code)
    if adapter:
        return adapters.load_adapter(adapter, opts.model, modality=opts.modality, num_frames=opts.frames, **kw)
    kw["attn_implementation"] = opts.attn_implementation
    if opts.modality == "title" and is_causal_lm(opts.model, opts.trust_remote_code):
        return TextBackend(opts.model, **kw)
    return VisionLanguageBackend(
        opts.model, modality=opts.modality, max_pixels=opts.max_pixels, num_frames=opts.frames, **kw
    )


def decode_pixels(backend, opts: RunOptions) -> int | None:
    """The pixel cap frames are decoded to (None: full size): decode_scale^2 x what the processor resizes to."""
    pixels = getattr(backend, "frame_pixels", None)
    if not opts.decode_scale or not pixels:
        return None
    return int(pixels * opts.decode_scale**2)


def decode_size(backend, opts: RunOptions):
    """`read_clip(size=...)` for --decode-scale 1 where the processor allows it (Qwen-VL budgets): frames are
    converted straight to the size the processor resizes to. None otherwise (the pixel cap applies)."""
    frame_size = getattr(backend, "frame_size", None)
    if opts.modality != "video" or opts.decode_scale != 1 or frame_size is None:
        return None
    return frame_size if frame_size(1080, 1920, opts.frames) is not None else None  # also caches the 1080p size


def preflight(backend, opts: RunOptions) -> dict | None:
    """Tokens of a worst-case item (a 1080p clip of --frames frames, or a 1080p cover) against the context."""
    import numpy as np

    from extract.models import Sample
    from extract.video import Clip

    if not hasattr(backend, "check_context") or opts.modality == "title" or opts.captions:
        return None
    item = Item("preflight", "", "")
    if opts.modality == "video":
        n = opts.frames
        frames = np.zeros((n, 1080, 1920, 3), np.uint8)
        idx = list(range(n))
        sample = Sample(item, clip=Clip(frames, [i / 30 for i in idx], 30.0, idx, n, n / 30))
        what = f"--frames {n} of a 1080p clip"
    else:
        sample, what = Sample(item, image=np.zeros((1080, 1920, 3), np.uint8)), "a 1080p cover"
    try:
        return backend.check_context([sample], f"{opts.model}: {what}")
    except ValueError as e:  # the processor refuses the settings themselves: every item would fail alike
        raise ExtractError(f"{opts.model}: the processor refuses {what} with these settings: {e}") from None


def check_video_decoder(opts: RunOptions, items: list[Item]) -> None:
    """With a hardware --video-decoder: opens the first of `items` whose mp4 exists on it, so that a missing device
    or driver stops the run with one error instead of failing every item."""
    if opts.modality != "video" or opts.video_decoder == CPU_DECODER:
        return
    for item in items:
        path = Path(opts.media) / f"{item.item_id}.mp4"
        if not path.is_file():
            continue
        try:
            read_clip(path, 1, decoder=opts.video_decoder, strict_device=True)
        except DecoderError as e:
            raise ExtractError(f"--video-decoder {opts.video_decoder}: {e}; use --video-decoder cpu") from None
        except MediaError:
            continue  # that file is damaged: the run records it; try the next one
        return


def decode_item(item: Item, opts: RunOptions, max_pixels: int | None = None, size=None):
    """Reads one item's media into a models.Sample; MediaError when unusable. `max_pixels`, `size`: read_clip's."""
    from extract.models import Sample

    if not uses_media(opts):
        return Sample(item)
    if opts.modality == "video":
        return Sample(
            item,
            clip=read_clip(
                Path(opts.media) / f"{item.item_id}.mp4",
                opts.frames,
                max_pixels=max_pixels,
                size=size,
                decoder=opts.video_decoder,
            ),
        )
    return Sample(item, image=read_image(Path(opts.media) / f"{item.item_id}.jpg"))


class _Stop(KeyboardInterrupt):
    """SIGTERM as an exception, so a terminated run flushes its finished items like Ctrl-C does."""


class RunStopped(ExtractError):
    """The run cannot go on (a device failure, too many failures in a row); finished items are flushed first."""


# Words of a RuntimeError that come from the device or its runtime, not from one item's data.
_DEVICE_WORDS = (
    "cuda",
    "cudnn",
    "cublas",
    "cufft",
    "cusolver",
    "cusparse",
    "nccl",
    "out of memory",
    "can't allocate memory",  # torch's CPU allocator
    "device-side assert",
    "illegal memory access",
    "hip error",
    "mps backend",
)


def device_failure(e: BaseException) -> bool:
    """Whether an exception of the model says the device/runtime failed (OOM, CUDA error) rather than an item."""
    if isinstance(e, MemoryError):
        return True
    import torch

    if isinstance(e, (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", torch.OutOfMemoryError))):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _DEVICE_WORDS)


def _ids(items, limit: int = 5) -> str:
    ids = [it.item_id for it in items]
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    line = line if len(line) <= limit else line[: limit - 3] + "..."
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def run(opts: RunOptions, *, on_batch: Callable[[int], None] | None = None) -> dict:
    """Runs (or resumes) one shard of an extraction; returns the shard manifest.

    Args:
      opts: the run's options.
      on_batch: called with the number of items written so far after each batch (tests use it to
        interrupt a run).
    """
    opts = resolve_options(opts)
    all_items = read_items(opts.items, opts.items_format)
    check_texts(all_items, opts)
    check_media_names(all_items, opts)
    index, count = opts.shard
    mine = select_shard(all_items, index, count)
    check_video_decoder(opts, mine)  # before loading a model for a run whose decoder cannot start
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise ExtractError(f"--out {out}: is a file; expected the output folder (new or of this extraction)")
    out.mkdir(parents=True, exist_ok=True)
    cfg = run_config(opts)
    _check_run_config(out, cfg, write=False)  # before loading a model for a folder that would refuse it
    prefix = _prefix(index, count)
    lock = ShardLock(out / f"lock-{prefix}", (index, count)).acquire()  # before touching any of the shard's files
    try:
        check_shard_count(out, count)
        return _run_locked(opts, out, cfg, all_items, mine, prefix, on_batch)
    finally:
        lock.release()


def check_shard_count(out: Path, count: int) -> None:
    """Shards of another count split the list otherwise: run at the same time, both would extract the same items
    (each then written twice, and the folder unmergeable). A resume with another N is fine once the other ended."""
    for other in sorted(out.glob("lock-part-*-of-*")):
        if other.name.endswith(f"-of-{count:05d}"):
            continue
        holder = live_holder(other)
        if holder is not None:
            raise ExtractError(
                f"{other}: a process (pid {holder.get('pid')} on host {holder.get('host')!r}) runs this folder with "
                f"another shard count than --shard I/{count}: both would extract the same items; wait for it to "
                "finish (or stop it), or give the same N"
            )


def _run_locked(opts, out, cfg, all_items, mine, prefix, on_batch) -> dict:
    index, count = opts.shard
    for stale in out.glob(f"{prefix}-*{records.SHARD_SUFFIX}.tmp"):
        stale.unlink()  # the open part of a killed run of this shard; its items are redone
    done, _, _ = scan_shards(out)
    check_same_items(out, done, all_items, opts.items)  # before the model loads, and before anything is written
    parts = [p.name for p in records.shard_files(out)]
    attested = read_attested(out)
    if attested is None:
        # A folder written before part files were listed: this run adopts what is there (checked like any resume).
        for name in parts:
            attest(out, prefix, name, records.shard_digest(out / name))
    check_attested(out, dict.fromkeys(parts), attested)  # names only here; the merge compares the records too
    if not uses_media(opts):  # title modality, title captions: the features are the list's texts
        check_item_texts(out, all_items, opts.items, record=True)
    todo = [it for it in mine if it.item_id not in done]
    seqs = [
        int(p.name[len(prefix) + 1 : -len(records.SHARD_SUFFIX)])
        for p in records.shard_files(out)
        if p.name.startswith(prefix)
    ]
    next_seq = max(seqs, default=-1) + 1
    failures_path = out / f"failures-{prefix}.jsonl"
    if failures_path.is_file():
        drop_torn_tail(failures_path)  # else the first append below would continue a killed run's torn line
    captions_path = out / f"captions-{prefix}.jsonl"
    started = time.time()
    manifest = {
        "shard": [index, count],
        "host": socket.gethostname(),
        "device": opts.device,
        "versions": _versions(),
        "items_in_shard": len(mine),
        "already_done": len(mine) - len(todo),
        "extracted": 0,
        "failed": 0,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": "running",
    }
    buffer: list[tuple[str, bytes, tuple]] = []

    def flush():
        nonlocal next_seq
        if not buffer:
            return
        path = out / f"{prefix}-{next_seq:06d}{records.SHARD_SUFFIX}"
        with records.ShardWriter(path, digest=True) as w:
            for item_id, data, shape in buffer:
                w.write_bytes(item_id, data, opts.dtype, shape)
            attest(out, prefix, path.name, w.hexdigest())  # before the rename: no file here is ever unlisted
        next_seq += 1
        buffer.clear()

    streak = [0]

    def fail(item: Item, stage: str, reason: str):
        manifest["failed"] += 1
        with open(failures_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"item_id": item.item_id, "stage": stage, "reason": reason, "time": time.time()}) + "\n")
        streak[0] += 1
        if opts.max_consecutive_failures and streak[0] >= opts.max_consecutive_failures:
            raise RunStopped(
                f"{failures_path}: {streak[0]} items in a row failed, the last {item.item_id} ({stage}: "
                f"{reason.splitlines()[0] if reason else ''}); stopped, since a problem that hits every item is not "
                "a per-item failure. The finished items are saved: fix the cause and rerun the same command to "
                "resume (--max-consecutive-failures 0 turns this check off)"
            )

    def succeeded():
        streak[0] = 0

    old_handler = signal.signal(signal.SIGTERM, _raise_stop) if _in_main_thread() else None
    try:
        if todo:
            _extract(opts, out, cfg, todo, buffer, flush, fail, succeeded, manifest, captions_path, on_batch)
        flush()
        manifest["status"] = "complete"
    except (KeyboardInterrupt, _Stop):
        flush()  # finished items survive an interruption
        manifest["status"] = "interrupted"
        raise
    except RunStopped as e:
        flush()  # finished items survive a stop
        manifest["status"] = f"stopped: {e}"
        raise
    except BaseException as e:
        manifest["status"] = f"error: {type(e).__name__}: {e}"
        raise
    finally:
        elapsed = time.time() - started
        manifest.update(
            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            seconds=round(elapsed, 3),
            items_per_second=round(manifest["extracted"] / elapsed, 4) if elapsed > 0 else None,
        )
        manifest["run_config"] = _shard_run_config(out)
        records.write_json_atomic(out / f"manifest-{prefix}.json", manifest)
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    report = finalize(out, [it.item_id for it in all_items], allow_failures=opts.allow_failures)
    manifest["folder_complete"] = report.complete
    # Every item is written or failed, but failures keep the folder unfinished (the CLI makes it an error).
    manifest["folder_failures"] = failures_message(out, report) if report.blocked_by_failures else None
    # With --allow-failures, every item may have failed: nothing to finalise, which is no success either.
    manifest["folder_empty"] = nothing_written_message(out, report) if report.nothing_written else None
    return manifest


def check_same_items(out: Path, done: dict, all_items: list[Item], items_path: str) -> None:
    """A resume must extract the same item list: records of ids the list lacks mean another list (compared by id,
    not by path, since paths differ between hosts), and finishing the run would break the folder."""
    check_known_ids(
        out,
        done,
        {it.item_id for it in all_items},
        f"--items {items_path}",
        "; this folder is another item list's: use another --out",
    )


def _shard_run_config(out: Path):
    """The folder's run_config.json as this shard saw it, for the merge to refuse shards of another run."""
    try:
        return json.loads((out / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return None


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_stop(signum, frame):
    raise _Stop(f"signal {signum}")


def _extract(opts, out, cfg, todo, buffer, flush, fail, succeeded, manifest, captions_path, on_batch):
    from collections import deque

    from tqdm import tqdm

    from extract.models import STORAGE_DTYPES, storage_problem, to_storage_bytes, weights_fingerprint

    t0 = time.time()
    backend = None if (opts.captions and opts.caption_source == "title") else build_backend(opts)
    encoder = None
    captions_done: dict[str, str] = {}
    if opts.captions:
        from extract.captions import TextEncoder, read_captions

        encoder = TextEncoder(opts.text_encoder, device=opts.device)
        captions_done = read_captions(captions_path)
        cfg["text_encoder_settings"] = encoder.settings
    pixels = decode_pixels(backend, opts) if opts.modality == "video" else None
    size = decode_size(backend, opts)
    cfg["processor"] = getattr(backend, "settings", None)
    # Name or path alone: weights edited in place, or another snapshot of a hub id on another host, would mix in.
    cfg["model_files"] = weights_fingerprint(opts.model) if backend is not None else None
    if opts.captions:
        cfg["text_encoder_files"] = weights_fingerprint(opts.text_encoder)
    cfg["decode_max_pixels"] = pixels
    if size is not None:
        # Frames resampled by FFmpeg instead of the processor: other pixels, so another extraction.
        cfg["decode_resize"] = "processor_size"
    manifest["preflight"] = preflight(backend, opts)  # first: a run refused here leaves the folder undefined
    _check_run_config(out, cfg, write=True)
    manifest["load_seconds"] = round(time.time() - t0, 3)
    manifest["batch_fallbacks"] = 0
    manifest["video_decoder"] = opts.video_decoder if opts.modality == "video" else None
    manifest["decoder_fallbacks"] = 0  # items the hardware decoder could not decode, decoded on the CPU instead
    tokens: list[int] = []
    t0 = time.time()
    batches = [todo[i : i + opts.batch_size] for i in range(0, len(todo), opts.batch_size)]
    # Hidden-state runs preprocess in the workers too (the processor costs as much CPU as decoding).
    prepare = getattr(backend, "prepare", None) if not opts.captions else None
    bar = tqdm(total=len(todo), unit="item", disable=not opts.progress, dynamic_ncols=True, smoothing=0.1)

    def fallback(n, err):
        manifest["batch_fallbacks"] += 1
        print(f"warning: a batch of {n} items failed ({err}); retrying them one by one", file=sys.stderr, flush=True)

    # Decoding (PyAV releases the GIL) and preprocessing run in worker threads, at most `prefetch` batches
    # ahead of the model, so memory stays bounded while the model never waits for the CPU side.
    with ThreadPoolExecutor(max_workers=opts.decode_workers) as pool:
        pending = deque()
        try:
            for batch in batches[: opts.prefetch]:
                pending.append(pool.submit(_prepare_batch, batch, opts, (pixels, size), prepare))
            for k, batch in enumerate(batches):
                try:
                    results, prepared = pending.popleft().result()
                except Exception as e:  # not a MediaError (those are per item): e.g. host memory exhausted
                    raise RunStopped(
                        f"decoding items {_ids(batch)} failed: {_one_line(e)}; stopped. The finished items are saved; "
                        "rerun the same command to resume (fewer --decode-workers / --prefetch need less memory)"
                    ) from None
                if k + opts.prefetch < len(batches):
                    pending.append(
                        pool.submit(_prepare_batch, batches[k + opts.prefetch], opts, (pixels, size), prepare)
                    )
                samples = []
                for item, res in zip(batch, results):
                    if isinstance(res, MediaError):
                        fail(item, "decode", str(res))
                        continue
                    if res.clip is not None and res.clip.decoder_fallback:
                        manifest["decoder_fallbacks"] += 1
                        print(
                            f"warning: item {item.item_id}: decoded on the CPU, the {res.clip.decoder_fallback}",
                            file=sys.stderr,
                            flush=True,
                        )
                    samples.append(res)
                for sample, vectors in _vectors(
                    backend, encoder, samples, prepared, opts, captions_done, captions_path, fail, fallback, tokens
                ):
                    stored = vectors.to(STORAGE_DTYPES[opts.dtype])  # cast once: checked, then written
                    problem = storage_problem(stored, opts.dtype)
                    if problem:
                        fail(sample.item, "model", problem)
                        continue
                    buffer.append((sample.item.item_id, to_storage_bytes(stored, opts.dtype), tuple(vectors.shape)))
                    manifest["extracted"] += 1
                    succeeded()
                    if len(buffer) >= opts.flush_every:
                        flush()
                bar.update(len(batch))
                # Throughput of the model loop alone (model loading excluded), kept current for interrupted runs.
                manifest["loop_seconds"] = round(time.time() - t0, 3)
                manifest["loop_items_per_second"] = round(manifest["extracted"] / max(time.time() - t0, 1e-9), 4)
                if tokens:
                    manifest["visual_tokens"] = {
                        "items": len(tokens),
                        "min": min(tokens),
                        "mean": round(sum(tokens) / len(tokens), 1),
                        "max": max(tokens),
                    }
                if on_batch is not None:
                    on_batch(manifest["extracted"])
        finally:
            for future in pending:  # a stopped run does not wait for batches it will not use
                future.cancel()
    bar.close()


def _prepare_batch(batch, opts, sizing, prepare):
    """Worker: decodes a batch's media and, where the backend allows, builds its model inputs.

    Returns (per item a Sample or a MediaError, the prepared inputs or None or the exception raised)."""
    results = []
    for item in batch:
        try:
            results.append(decode_item(item, opts, *sizing))
        except MediaError as e:
            results.append(e)
    samples = [r for r in results if not isinstance(r, MediaError)]
    prepared = None
    if prepare is not None and samples:
        try:
            prepared = prepare(samples)
        except Exception as e:  # one bad item: the model loop retries the batch one by one and reports it
            prepared = e
    return results, prepared


def _vectors(backend, encoder, samples, prepared, opts, captions_done, captions_path, fail, fallback, tokens):
    """Yields (sample, [rows, H] float32) for a batch; a batch that raises is retried item by item (counted
    and logged) so one bad item is recorded as a failure instead of stopping the run. A device or runtime
    failure (`device_failure`) raises RunStopped instead: retrying or recording it per item would turn a
    broken GPU into rows of zeros."""
    if not samples:
        return
    try:
        if isinstance(prepared, Exception):
            raise prepared
        if prepared is not None:
            out = backend.forward(prepared, opts.pool)
        else:
            out = _batch_vectors(backend, encoder, samples, opts, captions_done, captions_path)
        if opts.modality != "title":
            tokens.extend(getattr(backend, "last_visual_tokens", None) or [])
        yield from zip(samples, out)
        return
    except (ExtractError, KeyboardInterrupt, _Stop):
        raise
    except Exception as e:
        if device_failure(e):  # the device, not these items: stop (the finished items are flushed)
            raise RunStopped(
                f"the model failed on --device {opts.device} for item(s) {_ids([s.item for s in samples])}: {_one_line(e)}; stopped, "
                "since a device or runtime failure is not a problem of these items. The finished items are saved: "
                f"free the device (or lower --batch-size {opts.batch_size}, --max-pixels or --frames on out of "
                "memory) and rerun the same command to resume"
            ) from None
        if len(samples) == 1:
            fail(samples[0].item, "model", f"{type(e).__name__}: {e}")
            return
        fallback(len(samples), f"{type(e).__name__}: {e}")
    for s in samples:
        yield from _vectors(backend, encoder, [s], None, opts, captions_done, captions_path, fail, fallback, tokens)


def _batch_vectors(backend, encoder, samples, opts, captions_done, captions_path):
    if not opts.captions:
        return backend.hidden_states(samples, opts.pool)
    from extract.captions import append_captions

    need = [s for s in samples if s.item.item_id not in captions_done]
    if need:
        if opts.caption_source == "title":
            new = [s.item.text for s in need]
        else:
            new = backend.generate(need, opts.caption_tokens)
        pairs = [(s.item.item_id, c) for s, c in zip(need, new)]
        append_captions(captions_path, pairs)
        captions_done.update(pairs)
    return encoder.embed([captions_done[s.item.item_id] for s in samples])


def env_threads() -> None:
    """Honours OMP_NUM_THREADS for torch's intra-op pool (CPU runs on shared machines)."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
