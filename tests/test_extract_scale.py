"""The extractor at real scale: token budgets, per-layer pooling, seek decoding, no silent fallbacks, the
sentence-transformers text encoder, MiniCPM-V 4.6 end to end, and the run identity."""

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("av")

from extract_tiny import build_text_encoder, synth_frames, tiny_checkpoint  # noqa: E402

from extract import ExtractError  # noqa: E402
from extract.__main__ import main  # noqa: E402
from extract.captions import TextEncoder, sentence_transformers_settings  # noqa: E402
from extract.items import Item  # noqa: E402
from extract.models import (  # noqa: E402
    PROMPTS,
    Sample,
    TextBackend,
    VisionLanguageBackend,
    apply_token_budget,
    pool_hidden_states,
)
from extract.video import read_clip, write_test_video  # noqa: E402

torch.set_num_threads(2)
ARCHERY = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos" / "archery.mp4"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    specs = [(8, 48, 64), (3, 40, 40), (8, 36, 52)]  # 4, 3 and 4 frames at --frames 4: mixed counts
    return [
        read_clip(write_test_video(d / f"{i}.mp4", synth_frames(n, h, w, seed=i)), 4)
        for i, (n, h, w) in enumerate(specs)
    ]


def vlm(tmp_path_factory, kind, modality="video"):
    return VisionLanguageBackend(
        str(tiny_checkpoint(tmp_path_factory, kind)),
        modality=modality,
        prompt=PROMPTS["rec"],
        device="cpu",
        compute_dtype="float32",
        num_frames=4,
    )


def samples_of(clips):
    return [Sample(Item(str(i), f"t{i}", f"title {i}"), clip=c) for i, c in enumerate(clips)]


# --- per-layer pooling -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl", "llava_onevision", "minicpmv4_6"])
def test_hooked_pooling_equals_the_all_hidden_states_computation(tmp_path_factory, clips, kind):
    be = vlm(tmp_path_factory, kind)
    samples = samples_of([clips[0], clips[2]])  # one frame count: one forward for both paths
    x = be.inputs(samples)
    kwargs = {"position_ids": (x["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)} if be._pass_positions else {}
    with torch.inference_mode():
        hs = be.model(**x, **kwargs, output_hidden_states=True, use_cache=False).hidden_states
    vis = be.visual_mask(x)
    for pool in ("video_mean", "last", "all_mean"):
        want = pool_hidden_states(hs, x["attention_mask"], vis, pool)
        got = be.hidden_states(samples, pool)
        assert got.shape == want.shape == (2, len(hs), 32)
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6, rtol=0, err_msg=f"{kind} {pool}")


def test_hooked_pooling_on_a_text_lm(tmp_path_factory):
    be = TextBackend(
        str(tiny_checkpoint(tmp_path_factory, "text_lm")), prompt="x", device="cpu", compute_dtype="float32"
    )
    items = [Sample(Item("1", "a", "Toy Story (1995)")), Sample(Item("2", "b", "A person shoots an arrow at a target"))]
    x = be.inputs(items)
    pos = (x["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        hs = be.model(**x, position_ids=pos, output_hidden_states=True).hidden_states
    for pool in ("last", "all_mean"):
        want = pool_hidden_states(hs, x["attention_mask"], None, pool)
        np.testing.assert_allclose(be.hidden_states(items, pool).numpy(), want.numpy(), atol=1e-6, rtol=0)


def test_no_hidden_state_stack_is_returned(tmp_path_factory, clips):
    be = vlm(tmp_path_factory, "qwen2_5_vl")
    seen = []
    handle = be.model.register_forward_hook(lambda m, a, out: seen.append(out.hidden_states))
    try:
        be.hidden_states(samples_of(clips[:1]), "video_mean")
    finally:
        handle.remove()
    assert seen == [None]  # the model kept no per-layer tensors for the caller


# --- token budgets -----------------------------------------------------------------------------------------------


def _video_tokens(vp, frames=16, h=1080, w=1920):
    """Visual tokens a 16-frame 1080p clip costs with this video processor (without a model)."""
    out = vp(videos=[np.zeros((frames, h, w, 3), np.uint8)], do_sample_frames=False, return_tensors="pt")
    if "video_grid_thw" in out:
        return int(out["video_grid_thw"].prod(-1).sum()) // vp.merge_size**2
    return int((np.asarray(out["target_sizes_videos"]).prod(-1) // 16).sum())  # MiniCPM-V 4.6: 16x downsampling


@pytest.mark.parametrize(
    ("kind", "cls", "kwargs", "unbounded", "bounded"),  # visual tokens of a 16-frame 1080p clip
    [
        # Class defaults (what a hub folder without a separate video config gets)...
        ("qwen2_5_vl", "Qwen2VLVideoProcessor", {}, (5000, 7000), (1500, 2048)),
        # ... and the published Qwen3-VL video_preprocessor_config.json size (768 x 32 x 32 x 32 pixels a clip).
        (
            "qwen3_vl",
            "Qwen3VLVideoProcessor",
            {"size": {"longest_edge": 25165824, "shortest_edge": 4096}},
            (5000, 13000),
            (1500, 2048),
        ),
        # Sliced frames (up to 9 slices + a thumbnail each) -> one 448 px view a frame, ~64 tokens as in the paper.
        ("minicpmv4_6", "MiniCPMV4_6VideoProcessor", {}, (8000, 12000), (16 * 60, 16 * 70)),
    ],
)
def test_default_token_budget_per_family(kind, cls, kwargs, unbounded, bounded):
    import types

    import transformers

    vp = getattr(transformers, cls)(**kwargs)
    # MiniCPM-V's count is per frame (slow to process sliced): measured on 2 frames, scaled to 16.
    before = _video_tokens(vp, frames=2) * 8 if kind == "minicpmv4_6" else _video_tokens(vp)
    assert unbounded[0] <= before <= unbounded[1]
    processor = types.SimpleNamespace(video_processor=vp, image_processor=None)
    apply_token_budget(processor, kind, 16, None, kind)
    after = _video_tokens(vp)
    assert bounded[0] <= after <= bounded[1], (kind, before, after)


def test_max_pixels_is_per_frame_for_every_qwen_family(tmp_path_factory):
    import types

    import transformers

    for kind, cls in (("qwen2_5_vl", "Qwen2VLVideoProcessor"), ("qwen3_vl", "Qwen3VLVideoProcessor")):
        vp = getattr(transformers, cls)()
        apply_token_budget(types.SimpleNamespace(video_processor=vp), kind, 16, 64 * vp.patch_size**2 * 4, kind)
        assert 8 * 8 <= _video_tokens(vp) <= 8 * 64  # 8 temporal pairs of at most 64 merged tokens
    with pytest.raises(ExtractError, match="--max-pixels applies to Qwen-VL"):
        vlm_path = str(tiny_checkpoint(tmp_path_factory, "llava_onevision"))
        VisionLanguageBackend(
            vlm_path, modality="video", prompt="x", device="cpu", compute_dtype="float32", max_pixels=1
        )


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    for i in range(4):
        write_test_video(d / f"v{i}.mp4", synth_frames(3 + 2 * i, 32, 48, seed=i), fps=6)  # 3..9 frames
        (d / f"v{i}.jpg").write_bytes(b"")
        from PIL import Image

        Image.fromarray(synth_frames(1, 30 + 10 * i, 50, seed=i)[0]).save(d / f"v{i}.jpg")
    (d / "items.csv").write_text("id,title\n" + "".join(f"v{i},clip {i}\n" for i in range(4)))
    return d


def cli(media, model, out, *extra):
    args = ["--model", model, "--items", str(media / "items.csv"), "--media", str(media), "--out", str(out)]
    return main([*args, "--frames", "4", "--device", "cpu", "--no-progress", *extra])


def test_frames_beyond_the_context_are_refused_before_the_run(media, tmp_path, tmp_path_factory, capsys):
    qwen = str(tiny_checkpoint(tmp_path_factory, "qwen2_5_vl"))  # context 4,096; ~252 tokens per 1080p frame pair
    assert cli(media, qwen, tmp_path / "o", "--frames", "40") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "--frames 40 of a 1080p clip" in err and "context of 4096" in err
    assert not list((tmp_path / "o").glob("part-*"))


# --- no silent fallbacks -----------------------------------------------------------------------------------------


def test_covers_batched_equal_one_by_one(tmp_path_factory):
    be = vlm(tmp_path_factory, "qwen2_5_vl", modality="cover")
    images = [synth_frames(1, h, w, seed=h)[0] for h, w in ((40, 56), (64, 48), (30, 30))]
    samples = [Sample(Item(str(i), "", ""), image=im) for i, im in enumerate(images)]
    prepared = be.prepare(samples)
    assert len(prepared.groups) == 1 and all(t > 0 for t in prepared.visual_tokens)
    batched = be.forward(prepared, "video_mean")
    for i, s in enumerate(samples):
        np.testing.assert_allclose(batched[i].numpy(), be.hidden_states([s], "video_mean")[0].numpy(), atol=1e-5)


def test_mixed_frame_count_captions_batch_without_fallback(media, tmp_path, tmp_path_factory, clips, capsys):
    llava = vlm(tmp_path_factory, "llava_onevision")
    samples = samples_of(clips)  # 4, 3, 4 frames: LLaVA needs one count per call
    batched = llava.generate(samples, 3)
    assert batched == [llava.generate([s], 3)[0] for s in samples]
    out = tmp_path / "cc"
    encoder = str(tiny_checkpoint(tmp_path_factory, "text_encoder"))
    model = str(tiny_checkpoint(tmp_path_factory, "llava_onevision"))
    args = ["--captions", "--text-encoder", encoder, "--caption-tokens", "3", "--batch-size", "4"]
    assert cli(media, model, out, *args) == 0
    assert "warning:" not in capsys.readouterr().err
    manifest = json.loads((out / "manifest-part-00000-of-00001.json").read_text())
    assert manifest["batch_fallbacks"] == 0 and manifest["extracted"] == 4


# --- seek decoding -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("codec", "gop"), [("libx264", 5), ("libx264", 250), ("libx265", 6), ("libx265", 40)])
def test_seek_decoding_gives_the_full_decodes_frames(tmp_path, codec, gop):
    import av

    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV's FFmpeg has no {codec} encoder")
    frames = synth_frames(60, 48, 64, seed=3) + np.arange(60, dtype=np.uint8)[:, None, None, None]
    opts = {"preset": "ultrafast", "x265-params": "log-level=error"} if codec == "libx265" else {}
    path = write_test_video(tmp_path / "v.mp4", frames, fps=30, codec=codec, gop=gop, options=opts)
    for n in (16, 7, 1):
        full, seek = read_clip(path, n, method="full"), read_clip(path, n, method="seek")
        assert seek.method == "seek" and full.method == "full"
        np.testing.assert_array_equal(seek.frames, full.frames)
        assert seek.indices == full.indices and seek.timestamps == full.timestamps
        if gop <= 6 and n < 16:
            assert seek.decoded_frames < full.decoded_frames / 2  # short GOPs: only a few frames per sample


def test_seek_decoding_of_a_1080p_hevc_clip_with_scaling(tmp_path):
    import av

    from extract.bench import moving_frames

    codec = "libx265" if "libx265" in av.codecs_available else "libx264"
    opts = {"preset": "ultrafast", "x265-params": "log-level=error"} if codec == "libx265" else {}
    path = write_test_video(
        tmp_path / "hd.mp4", moving_frames(12, 1080, 1920), fps=30, codec=codec, gop=4, options=opts
    )
    full, seek = read_clip(path, 4, method="full"), read_clip(path, 4, method="seek")
    np.testing.assert_array_equal(seek.frames, full.frames)
    assert full.frames.shape == (4, 1080, 1920, 3) and seek.decoded_frames < full.decoded_frames
    small = read_clip(path, 4, max_pixels=640 * 360)
    assert small.frames.shape == (4, 360, 640, 3)
    # The shrunk frames are the full ones, scaled (the same picture, not other frames).
    ref = full.frames[:, ::3, ::3].astype(float)
    assert np.abs(small.frames.astype(float) - ref).mean() < 40


def test_seek_decoding_of_the_real_clip():
    if not ARCHERY.is_file():
        pytest.skip(f"{ARCHERY} not present (the project's shared sample clip)")
    full, seek = read_clip(ARCHERY, 16, method="full"), read_clip(ARCHERY, 16)
    np.testing.assert_array_equal(seek.frames, full.frames)
    assert seek.method == "seek" and seek.indices == full.indices and seek.decoded_frames <= full.decoded_frames


def numbered_frames(n, h=180, w=320):
    """Frame i shows i in binary as 10 black/white bands across its top half (robust to codecs and resizing),
    over a moving texture (real motion, so later frames depend on earlier ones), with a red square (colour order)."""
    tex = synth_frames(n, h - h // 2, w, seed=5)
    frames = []
    for i in range(n):
        f = np.zeros((h, w, 3), np.uint8)
        for b in range(10):
            f[: h // 2, b * w // 10 : (b + 1) * w // 10] = 255 * ((i >> b) & 1)
        f[h // 2 :] = tex[i]
        f[h - 24 :, :24] = (255, 0, 0)
        frames.append(f)
    return np.stack(frames)


def frame_numbers(clip):
    """The source frame number each decoded frame shows (read back from its bands)."""
    h, w = clip.frames.shape[1:3]
    cols = [int((b + 0.5) * w / 10) for b in range(10)]
    return [sum(int(f[h // 8 : h // 3, c].mean() > 128) << b for b, c in enumerate(cols)) for f in clip.frames]


def reference_frames(path) -> int:
    """How many frames of the file a decoder must decode at least (its reference frames: NONREF skips the rest)."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.codec_context.skip_frame = "NONREF"
        return sum(1 for _ in c.decode(s))


@pytest.fixture(scope="module")
def qwen_sizes(tmp_path_factory):
    return vlm(tmp_path_factory, "qwen2_5_vl")


@pytest.mark.parametrize(("codec", "gop"), [("libx264", 8), ("libx264", 100), ("libx265", 8), ("libx265", 40)])
def test_seek_to_the_processor_size_returns_the_sampled_frames(tmp_path, qwen_sizes, codec, gop):
    import av

    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV's FFmpeg has no {codec} encoder")
    opts = {"preset": "ultrafast", "x265-params": "log-level=error"} if codec == "libx265" else {}
    path = write_test_video(tmp_path / "v.mp4", numbered_frames(120), fps=30, codec=codec, gop=gop, options=opts)
    size = qwen_sizes.frame_size
    seek = read_clip(path, 16, size=size)
    full = read_clip(path, 16, method="full", size=size)
    assert seek.method == "seek" and seek.frames.shape == (16, *size(180, 320, 16), 3) == full.frames.shape
    expected = np.linspace(0, 119, 16).round().astype(int).tolist()
    assert frame_numbers(seek) == expected == seek.indices
    np.testing.assert_array_equal(seek.frames, full.frames)  # the same decoded frames, converted the same way
    red = seek.frames[:, -4, 4].astype(int)
    assert (red[:, 0] > 200).all() and (red[:, 1:] < 60).all()  # RGB order survives the planar conversion
    # No GOP is decoded twice: at most the file's reference frames plus the sampled ones. (x264's keyframe at
    # frame 100 sits 66 ms after its decode time, 1 ms less than the file's offset: mp4's index is in decode time,
    # so a seek to its presentation time lands on frame 0, and the old code decoded frames 0-99 again.)
    assert seek.decoded_frames <= reference_frames(path) + 16 and seek.cpu_seconds["decode"] > 0


def test_decoding_to_the_processor_size_feeds_the_processor_what_full_frames_do(tmp_path, qwen_sizes):
    """The fast path (seek, FFmpeg resizes to the processor's size) vs the path it replaces (every frame decoded,
    full-size RGB, the processor resizes): the same patch grid and, as a resampling difference, pixels within
    2/255 on average (measured: 1.1 on an upscaled real clip, 5.2 on a random 8 px block texture; see
    extract/README.md); frames in the wrong order are more than 5x further off."""
    be = qwen_sizes
    path = write_test_video(tmp_path / "hd.mp4", synth_frames(12, 1080, 1920, seed=2), fps=30, gop=4)
    fast = read_clip(path, 4, size=be.frame_size, max_pixels=be.frame_pixels)
    old = read_clip(path, 4, method="full")
    assert fast.frames.shape[1:3] == be.frame_size(1080, 1920, 4) != old.frames.shape[1:3]
    assert fast.indices == old.indices

    def pixels(clip):
        ((_, x),) = be.prepare([Sample(Item("0", "", ""), clip=clip)]).groups
        return x["pixel_values_videos"], x["video_grid_thw"]

    (a, grid_a), (b, grid_b) = pixels(fast), pixels(old)
    assert grid_a.tolist() == grid_b.tolist()
    std = torch.tensor(be.processor.video_processor.image_std)[None, :, None]

    def diff(x, y):
        return float(((x - y).abs().reshape(x.shape[0], 3, -1) * std * 255).mean())

    assert diff(a, b) < 2.0
    from dataclasses import replace

    shuffled, _ = pixels(replace(old, frames=old.frames[[1, 0, 3, 2]]))
    assert diff(shuffled, b) > 5 * max(diff(a, b), 0.2)


def test_decoding_to_the_processor_size_of_a_rotated_clip(tmp_path, qwen_sizes):
    path = write_test_video(tmp_path / "r.mp4", numbered_frames(40), fps=10, rotation=90)
    full = read_clip(path, 4)
    clip = read_clip(path, 4, size=qwen_sizes.frame_size)
    assert full.frames.shape[1:3] == (320, 180)  # upright: portrait
    assert clip.frames.shape[1:3] == qwen_sizes.frame_size(320, 180, 4)
    assert qwen_sizes.frame_size(320, 180, 4)[0] > qwen_sizes.frame_size(320, 180, 4)[1]
    from PIL import Image

    h, w = clip.frames.shape[1:3]
    ref = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC)) for f in full.frames])
    assert np.abs(clip.frames.astype(int) - ref).mean() < 4  # the same upright picture, not turned the other way
    assert np.abs(clip.frames[:, ::-1, ::-1].astype(int) - ref).mean() > 20


def test_only_qwen_budgets_decode_to_the_processor_size(tmp_path_factory, qwen_sizes):
    from extract.run import RunOptions, decode_size

    h, w = qwen_sizes.frame_size(1080, 1920, 16)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= qwen_sizes.frame_pixels
    assert qwen_sizes.frame_size(h, w, 16) == (h, w)  # the processor leaves that size as it is
    assert qwen_sizes.frame_size(8, 2000, 16) is None  # the processor refuses it: that item fails later, alone
    assert vlm(tmp_path_factory, "qwen3_vl").frame_size(1080, 1920, 4) is not None
    llava = vlm(tmp_path_factory, "llava_onevision")
    assert llava.frame_size(1080, 1920, 4) is None  # fixed sizes: the processor's own resize (and crop) stays
    opts = RunOptions(items="i", out="o", model="m", frames=16)
    assert decode_size(qwen_sizes, opts) == qwen_sizes.frame_size
    opts.decode_scale = 2.0
    assert decode_size(qwen_sizes, opts) is None and decode_size(llava, RunOptions(items="i", out="o")) is None


# --- text encoder ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pooling", "normalize"), [("cls_token", False), ("mean_tokens", True), ("lasttoken", False)])
def test_text_encoder_follows_the_sentence_transformers_folder(tmp_path, pooling, normalize):
    folder = build_text_encoder(tmp_path / "enc", pooling=pooling, normalize=normalize, max_seq_length=8)
    enc = TextEncoder(str(folder))
    texts = ["a person shoots an arrow at a target and describes the video", "toy story"]
    v = enc.embed(texts)[:, 0]
    x = enc.tokenizer(texts, padding=True, truncation=True, max_length=8, return_tensors="pt")
    assert x["input_ids"].shape[1] == 8  # sentence_bert_config.json's max_seq_length
    with torch.inference_mode():
        h = enc.model(**x).last_hidden_state
    mask = x["attention_mask"]
    if pooling == "cls_token":
        want = h[:, 0]
    elif pooling == "lasttoken":
        want = torch.stack([h[i, int(mask[i].sum()) - 1] for i in range(2)])
    else:
        want = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    if normalize:
        want = torch.nn.functional.normalize(want, dim=-1)
    np.testing.assert_allclose(v.numpy(), want.numpy(), atol=1e-6)
    assert enc.settings == {
        "pooling": pooling.replace("_tokens", "").replace("_token", ""),
        "normalize": normalize,
        "max_length": 8,
    }


def test_text_encoder_refuses_what_it_cannot_reproduce(tmp_path):
    folder = build_text_encoder(tmp_path / "w", pooling="weightedmean_tokens")
    with pytest.raises(ExtractError, match="weightedmean_tokens.*not one of the modes"):
        TextEncoder(str(folder))
    dense = build_text_encoder(tmp_path / "d")
    modules = json.loads((dense / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (dense / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ExtractError, match="is a Dense"):
        TextEncoder(str(dense))


def _fake_hub_cache(root: Path, repo: str, files: dict[str, str]) -> None:
    """The huggingface_hub cache layout (refs/main -> snapshots/<rev>/...) for one repo, offline."""
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0" * 40)
    for rel, text in files.items():
        path = base / "snapshots" / ("0" * 40) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_hub_ids_resolve_through_the_hub_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    from extract.adapters import detect, remote_load_kwargs

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    cls = {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    _fake_hub_cache(
        tmp_path,
        "org/encoder",
        {
            "modules.json": json.dumps(modules),
            "1_Pooling/config.json": json.dumps(cls),
            "sentence_bert_config.json": json.dumps({"max_seq_length": 256}),
        },
    )
    st = sentence_transformers_settings("org/encoder")
    assert (st["pooling"], st["normalize"], st["max_length"]) == ("cls", True, 256)
    # Not cached and offline: a plain encoder (said so at load time), never an exception.
    assert sentence_transformers_settings("org/absent")["pooling"] == "mean"
    _fake_hub_cache(
        tmp_path,
        "openbmb/MiniCPM-V-2_6",
        {
            "config.json": json.dumps(
                {"model_type": "minicpmv", "auto_map": {"AutoModel": "modeling_minicpmv.MiniCPMV"}}
            )
        },
    )
    _fake_hub_cache(tmp_path, "openbmb/MiniCPM-V-4.6", {"config.json": json.dumps({"model_type": "minicpmv4_6"})})
    assert detect("openbmb/MiniCPM-V-2_6") == "minicpmv" and detect("openbmb/MiniCPM-V-4.6") is None
    assert "dtype" in remote_load_kwargs("float32", "cpu")  # transformers >= 4.56 spells it dtype


# --- MiniCPM-V 4.6 end to end, identity --------------------------------------------------------------------------


def test_minicpmv46_end_to_end(media, tmp_path, tmp_path_factory):
    from dff_jax import records

    model = str(tiny_checkpoint(tmp_path_factory, "minicpmv4_6"))
    out = tmp_path / "feat"
    assert cli(media, model, out, "--batch-size", "4", "--dtype", "float32") == 0
    schema = records.read_schema(out)
    assert (schema.layers, schema.hidden_size, schema.num_items) == (3, 32, 4)  # 2 layers + embeddings
    shard = json.loads((out / "manifest-part-00000-of-00001.json").read_text())
    assert shard["visual_tokens"] == {"items": 4, "min": 12, "mean": 15.0, "max": 16}  # 4 tokens a frame, 3-4 frames
    # A 1080p frame keeps its aspect in the 112 px view: 6 tokens a frame, 4 frames.
    assert shard["batch_fallbacks"] == 0 and shard["preflight"]["visual_tokens"] == 24
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["processor"]["video_processor"]["slice_mode"] is False  # one view per frame, as in the paper
    got = {i: a for p in records.shard_files(out) for i, a in map(records.decode_item, records.iter_records(p))}
    be = vlm(tmp_path_factory, "minicpmv4_6")
    one = read_clip(media / "v2.mp4", 4, max_pixels=be.frame_pixels * 4)
    np.testing.assert_allclose(got["v2"], be.hidden_states(samples_of([one]), "video_mean")[0].numpy(), atol=1e-5)


def test_a_host_with_other_versions_cannot_add_to_the_folder(media, tmp_path, tmp_path_factory, capsys):
    model = str(tiny_checkpoint(tmp_path_factory, "qwen2_5_vl"))
    out = tmp_path / "feat"
    assert cli(media, model, out, "--shard", "0/2") == 0
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["compute_dtype"] == "float32" and cfg["transformers"] and cfg["torch"]
    assert cfg["processor"]["video_processor"]["size"]["longest_edge"] == 256 * 28 * 28
    assert cfg["decode_scale"] == 1 and cfg["decode_resize"] == "processor_size"  # other pixels: part of the identity
    assert cli(media, model, out, "--shard", "1/2", "--decode-scale", "2") == 2
    assert "decode_scale: 1.0 there vs 2.0 now" in capsys.readouterr().err
    cfg["transformers"] = "4.40.2"
    (out / "run_config.json").write_text(json.dumps(cfg))
    assert cli(media, model, out, "--shard", "1/2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "transformers: '4.40.2' there vs" in err[-1]
    cfg["transformers"] = __import__("transformers").__version__
    (out / "run_config.json").write_text(json.dumps(cfg))
    assert cli(media, model, out, "--shard", "1/2", "--model-dtype", "bfloat16") == 2
    assert "compute_dtype: 'float32' there vs 'bfloat16' now" in capsys.readouterr().err


def test_pipeline_bench_prints_both_paths(capsys):
    from extract import bench

    bench.main(["--pipeline", "--gops", "4", "--clips", "1", "--clip-seconds", "0.5", "--size", "64x96"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"gop"')]
    assert len(rows) == 1 and rows[0]["gop"] == 4
    full, x2, seek = rows[0]["full"], rows[0]["seek_x2"], rows[0]["seek"]
    assert full["decoded_frames"] == 15 and seek["decoded_frames"] <= full["decoded_frames"]
    assert full["visual_tokens"] == x2["visual_tokens"] == seek["visual_tokens"] > 0 and full["total_s"] > 0
    assert full["pixel_diff_vs_full"]["mean"] == 0 and seek["pixel_diff_vs_full"]["mean"] < 10
    assert all(p[k] >= 0 for p in (full, x2, seek) for k in ("index_s", "decode_s", "convert_s", "preprocess_s"))


def test_pipeline_bench_on_a_file_that_is_not_a_video_is_one_error(tmp_path, capsys):
    from extract import bench

    (tmp_path / "a.mp4").write_bytes(b"not a video" * 100)
    with pytest.raises(SystemExit) as e:
        bench.main(["--pipeline", "--files", str(tmp_path / "a.mp4"), "--size", "64x96", "--clips", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "a.mp4" in err[0], err


def test_damage_bench_counts_refused_h264_clips(capsys):
    from extract import bench

    bench.main(["--damage", "3", "--codecs", "libx264", "--gops", "6", "--clip-seconds", "1", "--size", "64x96"])
    row = json.loads(next(line for line in capsys.readouterr().out.splitlines() if line.startswith('{"codec"')))
    assert row["codec"] == "libx264" and row["refused"] + row["identical"] + row["different"] == 3
    assert row["refused"] >= 1  # H.264's decoder reports damaged slices (extract/README.md, Failed items)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--pipeline", "--gops", "0"], "--gops '0': expected integers >= 1"),
        (["--pipeline", "--gops", "30,x"], "--gops '30,x'"),
        (["--pipeline", "--size", "1080"], "--size '1080': expected HxW"),
        (["--pipeline", "--clip-seconds", "0"], "--clip-seconds 0.0: expected a positive number"),
        (["--frames", "0"], "--frames 0: expected an integer >= 1"),
        (["--damage", "-1"], "--damage -1: expected an integer >= 0"),
        # dropped or tracebacks before
        (["--pipeline", "--damage", "2"], "--pipeline and --damage measure different things; give one"),
        (["--damage", "2", "--files", "a.mp4"], "--files is read by --pipeline only"),
        (["--damage", "2", "--codecs", "libx264,bogus"], "--codecs: this PyAV's FFmpeg has no bogus encoder"),
        (["--pipeline", "--clip-seconds", "inf"], "--clip-seconds inf: expected a positive number of seconds"),
        (["--batch-sizes", "4,-1"], "--batch-sizes '4,-1'"),
        pytest.param(
            ["--device", "cuda"],
            "--device cuda: no CUDA device here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present"),
        ),
    ],
)
def test_bench_bad_arguments_are_one_line(capsys, args, says):
    from extract import bench

    with pytest.raises(SystemExit) as e:
        bench.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        e.value.code == 2 and len(err) == 1 and err[0].startswith("error: python -m extract.bench: ") and says in err[0]
    )


# --- hardware decoding (NVDEC) -----------------------------------------------------------------------------------


def _hevc_1080p(tmp_path, n=12, gop=4):
    import av

    from extract.bench import moving_frames

    codec = "libx265" if "libx265" in av.codecs_available else "libx264"
    opts = {"preset": "ultrafast", "x265-params": "log-level=error"} if codec == "libx265" else {}
    return write_test_video(
        tmp_path / "hd.mp4", moving_frames(n, 1080, 1920), fps=30, codec=codec, gop=gop, options=opts
    )


def _cuda_decodes(path) -> bool:
    from extract.video import DecoderError, hardware_decoders

    if "cuda" not in hardware_decoders():
        return False
    try:
        read_clip(path, 1, decoder="cuda", strict_device=True)
    except DecoderError:
        return False
    return True


def test_nvdec_gives_the_cpu_decoders_frames(tmp_path):
    path = _hevc_1080p(tmp_path, n=40, gop=12)
    if not _cuda_decodes(path):
        pytest.skip("no CUDA device or driver for PyAV's NVDEC decoder here")
    cpu, hw = read_clip(path, 16), read_clip(path, 16, decoder="cuda")
    assert hw.decoder == "cuda" and hw.decoder_fallback is None and hw.method == "seek"
    np.testing.assert_array_equal(hw.frames, cpu.frames)  # hardware HEVC/H.264 decoding is bit-exact
    assert hw.timestamps == cpu.timestamps and hw.decoded_frames == cpu.decoded_frames


def test_a_hardware_decoder_that_cannot_start_is_a_run_error_not_a_media_error(tmp_path, capsys):
    from extract.video import DecoderError, MediaError, hardware_decoders

    path = _hevc_1080p(tmp_path)
    if _cuda_decodes(path):
        pytest.skip("a CUDA decoder works here; test_nvdec_gives_the_cpu_decoders_frames covers it")
    if "cuda" in hardware_decoders():
        with pytest.raises(DecoderError, match=f"cuda decoder cannot be opened .*CPU decoder reads {path}"):
            read_clip(path, 4, decoder="cuda", strict_device=True)  # the run's start-up check
        # Within a run (the device was seen working), a file the device refuses to open is decoded on the CPU
        # and says so, instead of stopping the run.
        fallback = read_clip(path, 4, decoder="cuda")
        assert fallback.decoder == "cpu" and "cuda decoder cannot be opened" in fallback.decoder_fallback
        (tmp_path / "bad.mp4").write_bytes(b"\x00" * 4096)  # a damaged file stays a media error on any decoder
        with pytest.raises(MediaError, match="cannot open"):
            read_clip(tmp_path / "bad.mp4", 4, decoder="cuda")
    media = tmp_path / "m"
    media.mkdir()
    path.rename(media / "a.mp4")
    (media / "items.csv").write_text("id,title\na,x\n")
    args = ["--items", str(media / "items.csv"), "--media", str(media), "--out", str(tmp_path / "o")]
    for decoder, expected in (("cuda", "error: --video-decoder cuda: "), ("bogus", "error: unknown --video-decoder")):
        assert main(["--model", str(tmp_path / "none"), *args, "--video-decoder", decoder, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(expected), err
    assert not (tmp_path / "o").exists()  # refused before the model or the folder


def test_a_hardware_decoder_failure_on_one_file_falls_back_and_is_counted(
    media, tmp_path, tmp_path_factory, monkeypatch, capsys
):
    import extract.run
    from extract import video

    real = video._read_clip

    def flaky(path, *a):  # the device cannot decode v1 (a profile it lacks); the others decode "on the device"
        if a[-1] != "cpu" and path.name == "v1.mp4":
            raise video.MediaError(f"decoding failed in {path} after 0 frames: unsupported profile")
        return real(path, *a[:-1], "cpu")

    monkeypatch.setattr(video, "_read_clip", flaky)
    monkeypatch.setattr(extract.run, "check_video_decoder", lambda opts, items: None)
    clip = video.read_clip(media / "v1.mp4", 4, decoder="cuda")
    assert clip.decoder == "cpu" and "unsupported profile" in clip.decoder_fallback
    np.testing.assert_array_equal(clip.frames, real(media / "v1.mp4", 4, "seek", None, None, 0, "cpu").frames)
    if "cuda" not in video.hardware_decoders():
        pytest.skip("this PyAV has no cuda device type to ask for")
    model = str(tiny_checkpoint(tmp_path_factory, "qwen2_5_vl"))
    assert cli(media, model, tmp_path / "o", "--video-decoder", "cuda") == 0
    err = capsys.readouterr().err
    assert err.count("warning: item v1: decoded on the CPU, the cuda: ") == 1 and "v0" not in err
    manifest = json.loads((tmp_path / "o" / "manifest-part-00000-of-00001.json").read_text())
    assert manifest["decoder_fallbacks"] == 1 and manifest["video_decoder"] == "cuda" and manifest["extracted"] == 4
