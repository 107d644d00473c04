"""PyAV frame sampling: uniform over the clip, short/odd/rotated/variable-rate clips, unreadable files."""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")

from extract import video  # noqa: E402
from extract.video import MediaError, read_clip, write_test_video  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def numbered_frames(n, h=32, w=48):
    """Frame i is a flat grey of level 10 * i, so a decoded frame tells which source frame it was."""
    return np.stack([np.full((h, w, 3), 10 * i, np.uint8) for i in range(n)])


def levels(clip):
    return [int(round(f.mean() / 10)) for f in clip.frames]


def test_uniform_sampling_over_the_whole_clip(tmp_path):
    path = write_test_video(tmp_path / "v.mp4", numbered_frames(21), fps=10)
    clip = read_clip(path, 6)
    assert clip.frames.shape == (6, 32, 48, 3) and clip.frames.dtype == np.uint8
    assert levels(clip) == [0, 4, 8, 12, 16, 20]  # first and last frame included, evenly spaced
    assert clip.indices == [0, 4, 8, 12, 16, 20] and clip.timestamps == pytest.approx([0, 0.4, 0.8, 1.2, 1.6, 2.0])


def test_short_clip_gives_all_frames_and_odd_sizes_work(tmp_path):
    clip = read_clip(write_test_video(tmp_path / "short.mp4", numbered_frames(3), fps=5), 16)
    assert levels(clip) == [0, 1, 2]
    odd = read_clip(write_test_video(tmp_path / "odd.mp4", numbered_frames(4, 17, 33), fps=5), 16)
    assert odd.frames.shape == (4, 17, 33, 3)


def test_variable_frame_rate_samples_uniformly_in_time(tmp_path):
    # 9 frames in the first 80 ms, then one per second: index-uniform sampling would pick only early frames.
    times = [0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 1, 2, 3]
    clip = read_clip(write_test_video(tmp_path / "vfr.mp4", numbered_frames(12), times=times), 4)
    assert levels(clip) == [0, 9, 10, 11]
    assert clip.timestamps == pytest.approx([0, 1, 2, 3])
    # A processor computing index / fps recovers the true times (Qwen3-VL timestamps).
    assert np.asarray(clip.indices) / clip.fps == pytest.approx([0, 1, 2, 3], abs=0.5 / clip.fps)


def test_display_rotation_is_applied(tmp_path):
    frames = np.zeros((4, 32, 48, 3), np.uint8)
    frames[:, :8, :8] = 255  # a white top-left corner
    clip = read_clip(write_test_video(tmp_path / "rot.mp4", frames, rotation=90), 4)
    assert clip.frames.shape == (4, 48, 32, 3)  # portrait after rotation
    # A counter-clockwise quarter turn moves the top-left corner to the bottom-left.
    assert clip.frames[0, -8:, :8].mean() > 200 and clip.frames[0, :8, :8].mean() < 50


def test_unreadable_files_raise_media_error_with_reason(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(MediaError, match="empty file"):
        read_clip(tmp_path / "empty.mp4")
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(MediaError, match="cannot open"):
        read_clip(tmp_path / "junk.mp4")
    with pytest.raises(MediaError, match="missing file"):
        read_clip(tmp_path / "absent.mp4")
    from PIL import Image

    Image.fromarray(numbered_frames(1)[0]).save(tmp_path / "cover.jpg")
    (tmp_path / "cover.mp4").write_bytes((tmp_path / "cover.jpg").read_bytes())  # was a one-frame "video"
    with pytest.raises(MediaError, match=r"not a video: FFmpeg reads .*cover\.mp4 as a still image \(jpeg_pipe\)"):
        read_clip(tmp_path / "cover.mp4")


def test_real_archery_clip():
    path = SHARED_DATA / "videos" / "archery.mp4"
    if not path.is_file():
        pytest.skip("../shared/data/videos/archery.mp4 not present")
    clip = read_clip(path, 16)
    assert clip.frames.shape == (16, 240, 320, 3)
    assert clip.indices[0] == 0 and clip.indices[-1] == 299 and clip.total_frames == 300
    assert clip.fps == pytest.approx(29.97, abs=0.01)


def test_a_16_bit_cover_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    grey = np.zeros((4, 6), np.uint16)
    grey[:, 3:] = 40000
    grey[:, :3] = 20000
    path = tmp_path / "c.jpg"  # a PNG under a .jpg name, as cover archives have
    Image.fromarray(grey).save(path, format="PNG")
    rgb = video.read_image(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 6, 3)
    assert (rgb[:, :3] == 20000 >> 8).all() and (rgb[:, 3:] == 40000 >> 8).all()  # convert("RGB") gave 255


def test_a_cover_is_a_writable_array(tmp_path):
    # A read-only one made torch warn ("The given NumPy array is not writable") on every cover run.
    from PIL import Image

    Image.fromarray(numbered_frames(1)[0]).save(tmp_path / "c.png")
    assert video.read_image(tmp_path / "c.png").flags.writeable


def test_undecodable_covers_are_the_items_failure(tmp_path, monkeypatch):
    from PIL import Image

    path = tmp_path / "bomb.jpg"
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(path, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 100 pixels > 2 x the limit: PIL's DecompressionBombError
    with pytest.raises(video.MediaError, match="cannot decode image"):
        video.read_image(path)
    monkeypatch.undo()
    Image.fromarray(np.ones((3, 3), np.float32)).save(path := tmp_path / "f.tif")
    with pytest.raises(video.MediaError, match="floating-point"):
        video.read_image(path)


def test_a_raw_stream_named_mp4_is_decoded_whole(tmp_path):
    # A raw H.264 stream cannot seek: the full decode used to fail on seek(0) ("Operation not permitted").
    import av

    clip = write_test_video(tmp_path / "c.mp4", np.random.default_rng(0).integers(0, 255, (12, 32, 48, 3), np.uint8))
    raw = tmp_path / "raw.mp4"
    with av.open(str(clip)) as src, av.open(str(raw), "w", format="h264") as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = out
                dst.mux(packet)
    got = read_clip(raw, 4)
    assert got.method == "full" and got.decoded_frames == 12 and got.frames.shape == (4, 32, 48, 3)
    np.testing.assert_array_equal(got.frames[0], read_clip(clip, 4).frames[0])


def _noisy_frames(n, h=64, w=96, seed=0):
    # Noise keeps every frame's slices long, so a damaged byte lands inside coded macroblocks, not in padding.
    return np.random.default_rng(seed).integers(0, 255, (n, h, w, 3), np.uint8)


def test_a_damaged_but_decodable_stream_is_a_media_error(tmp_path):
    # FFmpeg conceals broken macroblocks and says so only in its log: the clip must fail, not decode to guesses.
    import av

    path = write_test_video(tmp_path / "v.mp4", _noisy_frames(24), gop=6)
    with av.open(str(path)) as container:
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size and not p.is_keyframe]
    data = bytearray(path.read_bytes())
    for pos, size in packets[::3]:
        data[pos + size // 2 : pos + size // 2 + 16] = bytes(range(0, 256, 16))  # mid-slice garbage
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    with pytest.raises(MediaError, match=r"damaged video stream in .*damaged\.mp4: FFmpeg \(h264\) reported"):
        read_clip(damaged, 16)
    assert read_clip(path, 16).frames.shape == (16, 64, 96, 3)  # the intact file decodes


def test_an_open_gop_stream_seeks_without_a_false_damage_report(tmp_path):
    # Leading B-frames of an open GOP refer to the GOP before the keyframe: a seek there makes FFmpeg log
    # errors that are not damage. The whole-file decode decides, and gives the same frames as method="full".
    path = write_test_video(
        tmp_path / "open.mp4", _noisy_frames(120), gop=12, options={"x264-params": "open-gop=1:bframes=3"}
    )
    got, full = read_clip(path, 4), read_clip(path, 4, method="full")
    assert got.indices == full.indices
    np.testing.assert_array_equal(got.frames, full.frames)
