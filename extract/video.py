"""Media decoding: uniformly sampled video frames (PyAV) and cover images (Pillow).

Paper section 3, "Data Preprocessing": "we uniformly sample up to 16 frames per video". Sampling is
uniform in *time* over the whole clip (from the first to the last frame's presentation time), then
each target time takes the nearest real frame; for constant-frame-rate files this is the usual
`linspace(0, total - 1, n)` over frame indices, and variable-frame-rate files are not biased towards
their dense parts. Display rotation (phone videos) is applied, frames of a stream that changes size
are brought to the first frame's size, and clips shorter than the request give all their frames.

Only the sampled frames and the frames they depend on are decoded (`_decode_seek`), and FFmpeg's scaler converts
them to RGB at the size the model's processor wants (`read_clip(size=...)`): at 1080p these two decide the CPU
cost of an item (extract/README.md, "CPU side: decode + preprocess").
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


class MediaError(Exception):
    """A media file that cannot be used; `str(e)` is the reason recorded in failures.jsonl."""


class DecoderError(Exception):
    """The hardware decoder asked for cannot be used at all (no device, no driver): a problem of the run, not of
    the file, which the CPU decoder reads."""


# read_clip(decoder=...): "cpu" (FFmpeg's software decoders) or a PyAV hardware device type, e.g. "cuda" (NVDEC).
CPU_DECODER = "cpu"


def hardware_decoders() -> list[str]:
    """The hardware device types this PyAV's FFmpeg was built with (a GPU and its driver are still needed)."""
    from av.codec.hwaccel import hwdevices_available

    return sorted(hwdevices_available())


def unknown_decoder(decoder: str) -> str | None:
    """Why `decoder` (a --video-decoder value) cannot be asked for at all, or None when it can."""
    if decoder == CPU_DECODER or decoder in hardware_decoders():
        return None
    have = ", ".join(hardware_decoders()) or "none"
    return f"unknown --video-decoder {decoder!r}; expected cpu or a hardware device type this PyAV's FFmpeg has: {have}"


@dataclasses.dataclass
class Clip:
    """Sampled frames of one video and the timing a processor needs (Qwen3-VL timestamps).

    Attributes:
      frames: [T, H, W, 3] uint8 RGB, upright (display rotation applied).
      timestamps: seconds from the first frame, one per sampled frame.
      fps: the stream's nominal frame rate.
      indices: `round(timestamp * fps)` per frame: frame numbers on the nominal grid, so a processor that
        computes `index / fps` (transformers' VideoMetadata.timestamps) recovers the true times.
      total_frames: frame count on the same grid (at least the number of decoded frames).
      duration: seconds from the first to the last frame plus one frame period.
      decoded_frames, method: how the frames were read (seek-based or the whole file).
      decoder: what decoded them: "cpu", a hardware decoder ("cuda"), or "cpu" after the hardware decoder failed
        on this file (`decoder_fallback` then holds its error).
      cpu_seconds: CPU seconds of the calling thread (all of the work with `threads=1`) per step: "index"
        (open + demux the packet index), "decode" (seeking, demuxing, decoding), "convert" (scaling to RGB).
    """

    frames: np.ndarray
    timestamps: list[float]
    fps: float
    indices: list[int]
    total_frames: int
    duration: float
    decoded_frames: int = 0  # frames the decoder produced to get these (the cost of the read)
    method: str = "full"  # "seek" or "full" (the whole file was decoded)
    cpu_seconds: dict = dataclasses.field(default_factory=dict)
    decoder: str = CPU_DECODER
    decoder_fallback: str | None = None


def _open(path: Path, decoder: str = CPU_DECODER):
    import av
    from av.codec.hwaccel import HWAccel

    if not path.is_file():
        raise MediaError(f"missing file {path}")
    if path.stat().st_size == 0:
        raise MediaError(f"empty file {path} (0 bytes)")
    try:
        if decoder == CPU_DECODER:
            return av.open(str(path))
        # Frames stay on the device (`is_hw_owned`): only the sampled ones are downloaded, by the reformat in
        # `_Decoder.rgb`; the reference frames they need are decoded there and never copied.
        hw = HWAccel(decoder, allow_software_fallback=False, is_hw_owned=True)
        return av.open(str(path), hwaccel=hw)
    except Exception as e:  # av raises InvalidDataError, OSError, ... depending on the damage
        reason = f"{type(e).__name__}: {e}"
    if decoder != CPU_DECODER:
        try:
            av.open(str(path)).close()
        except Exception:
            pass  # the file itself is damaged: a media error like any other
        else:
            raise DecoderError(f"the {decoder} decoder cannot be opened ({reason}), while the CPU decoder reads {path}")
    raise MediaError(f"cannot open {path}: {reason}")


def _packet_index(container, stream) -> tuple[list[float], list[float]]:
    """(presentation times of every frame, times of the keyframes), from demuxing packets only (no decoding)."""
    tb = float(stream.time_base) if stream.time_base else 0.0
    times, keys = set(), set()
    for p in container.demux(stream):
        if p.pts is None or p.size == 0:
            continue
        t = float(p.pts) * tb
        times.add(t)
        if p.is_keyframe:
            keys.add(t)
    return sorted(times), sorted(keys)


def _choose_times(times: list[float], num_frames: int) -> list[float]:
    """Uniform targets over [first, last]; each takes the nearest frame; duplicates removed."""
    if len(times) <= num_frames:
        return list(times)
    arr = np.asarray(times)
    targets = np.linspace(arr[0], arr[-1], num_frames)
    picks = np.abs(arr[None, :] - targets[:, None]).argmin(axis=1)
    return [times[i] for i in sorted(set(picks.tolist()))]


def scaled_size(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """The (width, height) a frame is converted to: unchanged, or shrunk (aspect kept, even sides) to at most
    `max_pixels` pixels. FFmpeg's scaler does this during the RGB conversion, far cheaper than a processor
    resizing a 1080p array afterwards; the processor still does its own final resize."""
    if not max_pixels or width * height <= max_pixels:
        return width, height
    s = (max_pixels / (width * height)) ** 0.5
    return max(2, int(width * s) // 2 * 2), max(2, int(height * s) // 2 * 2)


# A size function for read_clip: (upright height, width, frames) -> the (height, width) to convert frames to, or None.
SizeFn = Callable[[int, int, int], "tuple[int, int] | None"]


class _Decoder:
    """Frames of one stream converted to RGB at the clip's size; counts what was decoded and the conversion time."""

    def __init__(self, container, stream, max_pixels, size_fn: SizeFn | None = None, frames: int = 0, reopen=None):
        from av.video.reformatter import VideoReformatter

        self.container, self.stream, self.max_pixels = container, stream, max_pixels
        self.reopen = reopen  # () -> (container, stream) read from the start, for files that cannot seek
        self.size_fn, self.sampled = size_fn, frames
        self.tb = float(stream.time_base) if stream.time_base else 0.0
        self.size = None  # (width, height) in the stream's (stored) orientation
        self.exact = False  # converting straight to the processor's size
        self.reformatter = VideoReformatter()  # one scaler context for the clip, not one per frame
        self.decoded = 0
        self.seeks = 0
        self.convert_s = 0.0

    def _choose_size(self, frame, quarter_turns: int) -> tuple[int, int]:
        upright = (frame.width, frame.height) if quarter_turns % 2 else (frame.height, frame.width)
        exact = self.size_fn(*upright, self.sampled) if self.size_fn is not None else None
        if exact:
            self.exact = True
            h, w = exact
            return (h, w) if quarter_turns % 2 else (w, h)
        return scaled_size(frame.width, frame.height, self.max_pixels)

    def rgb(self, frame) -> np.ndarray:
        t = time.thread_time()
        # PyAV's VideoFrame.rotation (display side data, not carried over by reformat()): degrees the display
        # matrix rotates the frame counter-clockwise.
        quarter_turns = int(round(frame.rotation / 90.0)) % 4
        if self.size is None:
            self.size = self._choose_size(frame, quarter_turns)
        w, h = self.size
        if (frame.width, frame.height) == (w, h):
            rgb = frame.to_ndarray(format="rgb24")
        elif self.exact:
            # Scale and convert in one pass, bicubic as the Qwen-VL processors resize. Planar RGB output: packed
            # rgb24 from a scaled 4:2:0 frame keeps half the horizontal chroma resolution (without FFmpeg's
            # full_chroma_int flag, which PyAV does not expose): 14.5 vs 5.2 mean pixel error against the processor's
            # own resize on a colourful 8 px texture, the same on smooth content (extract/README.md).
            rgb = self.reformatter.reformat(frame, width=w, height=h, format="gbrp", interpolation="BICUBIC")
            rgb = rgb.to_ndarray()
        else:
            # Scale in YUV first (4:2:0 has half the samples of RGB), then convert: ~2.5x cheaper than scaling
            # during the RGB conversion (measured at 1080p).
            frame = self.reformatter.reformat(frame, width=w, height=h, interpolation="AREA")
            rgb = frame.to_ndarray(format="rgb24")
        rgb = np.ascontiguousarray(np.rot90(rgb, k=quarter_turns)) if quarter_turns else rgb
        self.convert_s += time.thread_time() - t
        return rgb

    def frames(self):
        for frame in self.container.decode(self.stream):
            self.decoded += 1
            yield frame


def _decode_seek(dec: _Decoder, wanted: list[float], keys: list[float]):
    """The wanted frames by seeking to the keyframe before them and decoding forward from there.

    Packets are fed to the decoder one by one: the wanted frames' packets are decoded in full, every other one
    with `skip_frame="NONREF"`, so frames no later frame refers to (most B-frames) are not decoded at all, while
    every reference frame a wanted one may need is. Decoding goes on forward while the next wanted frame lies in
    the GOP being decoded; otherwise a seek to its keyframe skips the rest of this GOP, so no GOP is decoded twice
    and none for nothing. After a seek, packets before that keyframe (a demuxer may land on an earlier one: mp4's
    index is in decode time) are demuxed but not decoded. Returns None when
    the file's index or timestamps do not allow this (a wanted frame never came out of the decoder); the caller
    then decodes the whole file.
    """
    ctx = dec.stream.codec_context
    want = set(wanted)
    got: dict[float, np.ndarray] = {}
    packets = None  # the packet iterator since the last seek
    fed, last_fed, at_key = set(), float("-inf"), True  # times of the packets fed since that seek
    for target in wanted:
        if target in got:
            continue
        k = int(np.searchsorted(keys, target, side="right")) - 1
        key = keys[k] if k >= 0 else None  # None: before the first keyframe, decode from the start
        if packets is None or (target not in fed and key is not None and key > last_fed):
            dec.container.seek(int(round((key or 0.0) / dec.tb)), stream=dec.stream, backward=True, any_frame=False)
            ctx.flush_buffers()
            dec.seeks += 1
            packets = dec.container.demux(dec.stream)
            fed, last_fed, at_key = set(), float("-inf"), key is None
        for packet in itertools.chain(packets, [None]):
            if packet is None:  # end of stream: drain the frames the decoder still holds
                ctx.skip_frame = "DEFAULT"
                out = ctx.decode(None)
                packets = None
            else:
                if packet.size == 0:
                    continue
                if packet.pts is None:
                    return None
                t = float(packet.pts) * dec.tb
                if not at_key:
                    if not (packet.is_keyframe and t == key):
                        if packet.is_keyframe and t > key:
                            return None  # the seek went past the keyframe
                        continue
                    at_key = True
                fed.add(t)
                last_fed = max(last_fed, t)
                ctx.skip_frame = "DEFAULT" if t in want else "NONREF"
                out = ctx.decode(packet)
            for frame in out:
                dec.decoded += 1
                ft = float(frame.pts) * dec.tb if frame.pts is not None else None
                if ft in want and ft not in got:
                    got[ft] = dec.rgb(frame)
            if target in got or packets is None:
                break
        if target not in got:
            return None
    ctx.skip_frame = "DEFAULT"
    return [got[t] for t in wanted], list(wanted)


def _decode_all(dec: _Decoder, wanted: set[float] | None):
    """Every frame of the file in order, keeping the wanted ones (all of them when `wanted` is None)."""
    import av

    try:
        dec.container.seek(0)
    except av.FFmpegError:  # a file that cannot seek (a raw H.264/HEVC stream named .mp4): read it again
        if dec.reopen is None:
            raise
        dec.container.close()
        dec.container, dec.stream = dec.reopen()
    dec.seeks += 1
    frames, stamps = [], []
    for frame in dec.frames():
        t = float(frame.pts) * dec.tb if frame.pts is not None else None
        if wanted is not None and t not in wanted:
            continue
        frames.append(dec.rgb(frame))
        stamps.append(t if t is not None else float(dec.decoded - 1))
    return frames, stamps


def read_clip(
    path: str | Path,
    num_frames: int = 16,
    *,
    method: str = "seek",
    max_pixels: int | None = None,
    size: SizeFn | None = None,
    threads: int = 1,
    decoder: str = CPU_DECODER,
    strict_device: bool = False,
) -> Clip:
    """Decodes up to `num_frames` frames sampled uniformly over the whole clip.

    Args:
      method: "seek" decodes only from the keyframe before each sampled frame up to it; "full" decodes every
        frame of the file (the reference; also what "seek" does when half the frames or more are wanted or the
        file's index does not allow seeking; `Clip.method` says which was used).
      max_pixels: frames larger than this are scaled down (aspect kept) while converted to RGB.
      size: `size(height, width, frames)` of the upright first frame and the number of sampled frames gives the
        (height, width) to convert every frame to (the model processor's own size, so it has nothing left to
        resize), or None to use `max_pixels`.
      threads: FFmpeg decoding threads. 1 (the default): one core, as the benchmark measures; the extractor
        decodes clips in parallel instead (--decode-workers). With more, errors FFmpeg's own threads report
        escape the damage check below (they are not said on this thread).
      decoder: "cpu", or a hardware device type of `hardware_decoders()` ("cuda": NVDEC). The same seek and
        skip logic applies (FFmpeg parses the stream on the CPU and hands the slices to the device); a file the
        device cannot decode (a profile it lacks) is decoded again on the CPU and says so in `Clip.decoder_fallback`.
      strict_device: raise DecoderError when the device cannot open this file (the run's check that the device
        works at all, `run.check_video_decoder`); otherwise that too is a per-file CPU fallback, since the device
        was seen working: stopping the run for one file the device refuses would need a restart with the CPU.

    Raises:
      MediaError: missing, empty, unreadable or frameless files, with the reason; also a damaged stream, one
        for which the decoder reported an error while it made the frames: FFmpeg conceals damage (patches the
        broken blocks from neighbouring ones) and says so only in its log, which is read here.
      DecoderError: the hardware decoder cannot be opened at all (no device or driver).
    """
    path = Path(path)
    if decoder == CPU_DECODER:
        return _read_clip(path, num_frames, method, max_pixels, size, threads, decoder)
    try:
        return _read_clip(path, num_frames, method, max_pixels, size, threads, decoder)
    except (MediaError, DecoderError) as e:
        if isinstance(e, DecoderError) and strict_device:
            raise
        clip = _read_clip(path, num_frames, method, max_pixels, size, threads, CPU_DECODER)
        clip.decoder_fallback = f"{decoder}: {e}"
        return clip


def _read_clip(path: Path, num_frames, method, max_pixels, size, threads, decoder) -> Clip:
    import av.logging

    _log_decoder_errors()
    with av.logging.Capture(local=True) as log:
        clip = _decode_clip(path, num_frames, method, max_pixels, size, threads, decoder)
    errors = _errors(log)
    if errors:
        # A hardware decoder's error goes the CPU fallback's way (read_clip), which then decides.
        name, message = errors[0]
        raise MediaError(
            f"damaged video stream in {path}: FFmpeg ({name or 'decoder'}) reported {len(errors)} error(s) "
            f"while decoding the sampled frames, the first: {message!r} (its frames would be concealed guesses)"
        )
    return clip


def _errors(log: list) -> list[tuple[str, str]]:
    """(name, message) of the error-level entries of an `av.logging.Capture` log."""
    import av.logging

    return [(name, message.strip()) for level, name, message in log if level <= av.logging.ERROR]


def _log_decoder_errors() -> None:
    """Turns on FFmpeg's error log, which PyAV keeps off: concealed damage is said only there (read_clip)."""
    import av.logging

    if av.logging.get_level() is None:
        av.logging.set_level(av.logging.ERROR)
    # PyAV drops a message identical to the one before it, from any thread: another clip's would be lost.
    av.logging.set_skip_repeated(False)


def _decode_clip(path: Path, num_frames, method, max_pixels, size, threads, decoder) -> Clip:
    import av
    import av.logging

    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if method not in ("seek", "full"):
        raise ValueError(f"method must be seek or full, got {method!r}")
    t_start = time.thread_time()

    def open_stream():
        container = _open(path, decoder)
        if not container.streams.video:
            container.close()
            raise MediaError(f"no video stream in {path}")
        fmt = container.format.name
        if fmt == "image2" or fmt.endswith("_pipe"):  # a cover saved as <id>.mp4 would be a one-frame "video"
            container.close()
            raise MediaError(f"not a video: FFmpeg reads {path} as a still image ({fmt})")
        stream = container.streams.video[0]
        # Frame threading would apply the per-packet skip_frame of the seek path late; slice threading does not.
        stream.thread_type = "SLICE" if method == "seek" else "AUTO"
        stream.codec_context.thread_count = threads
        return container, stream

    container, stream = open_stream()
    dec = None
    try:
        try:
            times, keys = _packet_index(container, stream)
        except av.FFmpegError as e:
            raise MediaError(f"cannot demux {path}: {e}") from None
        tb = float(stream.time_base) if stream.time_base else 0.0
        wanted = _choose_times(times, num_frames) if times and tb > 0 else None
        t_index = time.thread_time()
        dec = _Decoder(container, stream, max_pixels, size, len(wanted) if wanted else num_frames, open_stream)
        used = method
        try:
            # Seeking pays off only for a sparse sample; half the frames or more are cheaper decoded in one pass.
            sparse = wanted and keys and 2 * len(wanted) < len(times)
            with av.logging.Capture(local=True) as seek_log:
                got = _decode_seek(dec, wanted, keys) if method == "seek" and sparse else None
            # An error on the seek path is damage or an artefact of seeking (leading frames of an open GOP refer
            # to frames before the keyframe); the whole-file decode, which has no seek artefacts, tells them apart.
            if got is None or _errors(seek_log):
                got = None
                used = "full"
                got = _decode_all(dec, set(wanted) if wanted is not None else None)
        except av.FFmpegError as e:
            raise MediaError(f"decoding failed in {path} after {dec.decoded} frames: {e}") from None
        frames, stamps = got
        if wanted is None:
            # No usable timestamps: every frame was kept; sample by decode order instead.
            keep = np.linspace(0, len(frames) - 1, min(num_frames, len(frames))).round().astype(int) if frames else []
            frames = [frames[i] for i in keep]
            stamps = [float(i) for i in keep]
        if not frames:
            raise MediaError(f"no decodable video frames in {path}")
        fps = float(dec.stream.average_rate or dec.stream.guessed_rate or 0) or 30.0
    finally:
        (dec.container if dec is not None else container).close()
    t_end = time.thread_time()
    cpu = {
        "index": t_index - t_start,
        "decode": t_end - t_index - dec.convert_s,
        "convert": dec.convert_s,
    }
    t0 = stamps[0]
    rel = [s - t0 for s in stamps]
    if wanted is None:
        rel = [s / fps for s in rel]  # stamps were decode positions
    indices = [int(round(r * fps)) for r in rel]
    # Equal indices (two frames closer than one nominal period in a VFR file) would give a processor
    # duplicate timestamps; keep them strictly increasing.
    for i in range(1, len(indices)):
        indices[i] = max(indices[i], indices[i - 1] + 1)
    total_span = (times[-1] - times[0]) if times else rel[-1]
    total = max(len(times), indices[-1] + 1, int(round(total_span * fps)) + 1)
    return Clip(
        frames=np.stack(frames),
        timestamps=rel,
        fps=fps,
        indices=indices,
        total_frames=total,
        duration=total_span + 1.0 / fps,
        decoded_frames=dec.decoded,
        method=used,
        cpu_seconds={k: round(v, 6) for k, v in cpu.items()},
        decoder=decoder,
    )


def read_image(path: str | Path) -> np.ndarray:
    """Reads a cover image as [H, W, 3] uint8 RGB, upright (EXIF orientation applied).

    Raises:
      MediaError: missing, empty or undecodable files.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"missing file {path}")
    if path.stat().st_size == 0:
        raise MediaError(f"empty file {path} (0 bytes)")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode == "F":
                raise MediaError(f"cannot decode image {path}: floating-point pixels (mode F); expected 8 or 16 bits")
            if im.mode.startswith("I"):  # 16-bit greyscale (PNG/TIFF): convert("RGB") would clip it to 255
                grey = np.right_shift(np.clip(np.asarray(im, np.int64), 0, 65535), 8).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            # A copy: np.asarray of a PIL image is read-only, which torch warns about for every cover run.
            return np.array(im.convert("RGB"))
    # A decompression bomb (a few bytes claiming 20000 x 20000 pixels), a broken header (SyntaxError, ValueError):
    # this item's failure, not the run's.
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError, SyntaxError) as e:
        raise MediaError(f"cannot decode image {path}: {e}") from None


def write_test_video(
    path: str | Path,
    frames,
    fps: int = 8,
    rotation: int = 0,
    times=None,
    codec: str | None = None,
    gop: int | None = None,
    options: dict | None = None,
) -> Path:
    """Encodes uint8 RGB frames [T, H, W, 3] (an array or any iterable of frames) as an mp4.

    Used by the tests, the benchmark and anyone who wants a clip to try the command line on. `codec` defaults
    to H.264 (even sizes) or MPEG-4; `gop` sets the keyframe interval; `times` (seconds, increasing) makes a
    variable-frame-rate file; `rotation` sets a display rotation; `options` go to the encoder.
    """
    from fractions import Fraction

    import av

    path = Path(path)
    frames = iter(frames)
    first = next(frames)
    h, w, _ = first.shape
    with av.open(str(path), "w") as out:
        codec = codec or ("libx264" if h % 2 == 0 and w % 2 == 0 else "mpeg4")
        stream = out.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)  # millisecond pts allow variable frame rates
        if gop:
            stream.codec_context.gop_size = gop
        if rotation:
            stream.set_display_rotation(rotation)
        for i, rgb in enumerate(itertools.chain([first], frames)):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = int(round((times[i] if times is not None else i / fps) * 1000))
            frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
