"""Media decoding: uniformly sampled video frames (PyAV) and cover images (Pillow).

Paper section 3, "Data Preprocessing": "we uniformly sample up to 16 frames per video". Sampling is
uniform in *time* over the whole clip (from the first to the last frame's presentation time), then
each target time takes the nearest real frame; for constant-frame-rate files this is the usual
`linspace(0, total - 1, n)` over frame indices, and variable-frame-rate files are not biased towards
their dense parts. Display rotation (phone videos) is applied, frames of a stream that changes size
are brought to the first frame's size, and clips shorter than the request give all their frames.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np


class MediaError(Exception):
    """A media file that cannot be used; `str(e)` is the reason recorded in failures.jsonl."""


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
    """

    frames: np.ndarray
    timestamps: list[float]
    fps: float
    indices: list[int]
    total_frames: int
    duration: float


def _open(path: Path):
    import av

    if not path.is_file():
        raise MediaError(f"missing file {path}")
    if path.stat().st_size == 0:
        raise MediaError(f"empty file {path} (0 bytes)")
    try:
        return av.open(str(path))
    except Exception as e:  # av raises InvalidDataError, OSError, ... depending on the damage
        raise MediaError(f"cannot open {path}: {type(e).__name__}: {e}") from None


def _frame_times(container, stream) -> list[float]:
    """Presentation times (s) of every frame, from demuxing packets only (no decoding)."""
    tb = float(stream.time_base) if stream.time_base else 0.0
    times = [float(p.pts) * tb for p in container.demux(stream) if p.pts is not None and p.size > 0]
    return sorted(set(times))


def _choose_times(times: list[float], num_frames: int) -> list[float]:
    """Uniform targets over [first, last]; each takes the nearest frame; duplicates removed."""
    if len(times) <= num_frames:
        return list(times)
    arr = np.asarray(times)
    targets = np.linspace(arr[0], arr[-1], num_frames)
    picks = np.abs(arr[None, :] - targets[:, None]).argmin(axis=1)
    return [times[i] for i in sorted(set(picks.tolist()))]


def _upright(rgb: np.ndarray, rotation: int) -> np.ndarray:
    # PyAV's VideoFrame.rotation: degrees the display matrix rotates the frame counter-clockwise.
    quarter_turns = int(round(rotation / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(rgb, k=quarter_turns)) if quarter_turns else rgb


def read_clip(path: str | Path, num_frames: int = 16) -> Clip:
    """Decodes up to `num_frames` frames sampled uniformly over the whole clip.

    Raises:
      MediaError: missing, empty, unreadable or frameless files, with the reason.
    """
    import av

    path = Path(path)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    container = _open(path)
    try:
        if not container.streams.video:
            raise MediaError(f"no video stream in {path}")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        tb = float(stream.time_base) if stream.time_base else 0.0
        try:
            times = _frame_times(container, stream)
        except av.FFmpegError as e:
            raise MediaError(f"cannot demux {path}: {e}") from None
        wanted = set(_choose_times(times, num_frames)) if times and tb > 0 else None
        container.seek(0)
        frames, stamps, size = [], [], None
        decoded = 0
        try:
            for frame in container.decode(stream):
                decoded += 1
                t = float(frame.pts) * tb if frame.pts is not None else None
                if wanted is not None and t not in wanted:
                    continue
                if size is None:
                    size = (frame.width, frame.height)
                rgb = frame.to_ndarray(width=size[0], height=size[1], format="rgb24")
                frames.append(_upright(rgb, frame.rotation))
                stamps.append(t if t is not None else float(decoded - 1))
        except av.FFmpegError as e:
            raise MediaError(f"decoding failed in {path} after {decoded} frames: {e}") from None
        if wanted is None:
            # No usable timestamps: every frame was kept; sample by decode order instead.
            keep = np.linspace(0, len(frames) - 1, min(num_frames, len(frames))).round().astype(int) if frames else []
            frames = [frames[i] for i in keep]
            stamps = [float(i) for i in keep]
        if not frames:
            raise MediaError(f"no decodable video frames in {path}")
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 30.0
    finally:
        container.close()
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
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise MediaError(f"cannot decode image {path}: {e}") from None


def write_test_video(path: str | Path, frames: np.ndarray, fps: int = 8, rotation: int = 0, times=None) -> Path:
    """Encodes uint8 RGB frames [T, H, W, 3] as an H.264 (even sizes) or MPEG-4 mp4.

    Used by the tests and by anyone who wants a tiny clip to try the command line on; `times` (seconds,
    increasing) makes a variable-frame-rate file, `rotation` sets a display rotation.
    """
    from fractions import Fraction

    import av

    path = Path(path)
    t, h, w, _ = frames.shape
    with av.open(str(path), "w") as out:
        codec = "libx264" if h % 2 == 0 and w % 2 == 0 else "mpeg4"
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)  # millisecond pts allow variable frame rates
        if rotation:
            stream.set_display_rotation(rotation)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = int(round((times[i] if times is not None else i / fps) * 1000))
            frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
