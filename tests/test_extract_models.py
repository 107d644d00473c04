"""Extractor backends on tiny offline checkpoints: shapes, pooled positions, batch == one-by-one."""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("av")

from extract_tiny import synth_frames, tiny_checkpoint  # noqa: E402

from dff_jax import records  # noqa: E402
from extract import ExtractError  # noqa: E402
from extract.items import Item  # noqa: E402
from extract.models import (  # noqa: E402
    PROMPTS,
    Sample,
    TextBackend,
    VisionLanguageBackend,
    pool_hidden_states,
    to_storage_bytes,
)
from extract.video import read_clip, write_test_video  # noqa: E402

torch.set_num_threads(2)
VLM_KINDS = ["qwen2_5_vl", "qwen3_vl", "llava_onevision"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    specs = [(8, 48, 64), (5, 40, 40), (8, 36, 52), (1, 32, 32)]
    return [
        read_clip(write_test_video(d / f"{i}.mp4", synth_frames(n, h, w, seed=i)), 4)
        for i, (n, h, w) in enumerate(specs)
    ]


def backend(tmp_path_factory, kind, modality="video"):
    path = tiny_checkpoint(tmp_path_factory, kind)
    return VisionLanguageBackend(
        str(path), modality=modality, prompt=PROMPTS["rec"], device="cpu", compute_dtype="float32"
    )


def samples_of(clips):
    return [Sample(Item(str(i), f"t{i}", f"title {i}"), clip=c) for i, c in enumerate(clips)]


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_batched_equals_one_by_one(tmp_path_factory, clips, kind):
    be = backend(tmp_path_factory, kind)
    samples = samples_of(clips)  # mixed frame counts (4, 4, 4, 1): LLaVA sub-batches by count
    for pool in ("video_mean", "last", "all_mean"):
        batched = be.hidden_states(samples, pool)
        assert batched.shape == (4, 4, 32) and batched.dtype == torch.float32  # 3 layers + embeddings
        for i, s in enumerate(samples):
            single = be.hidden_states([s], pool)[0]
            np.testing.assert_allclose(batched[i].numpy(), single.numpy(), atol=1e-4, err_msg=f"{kind} {pool} item {i}")
    # Different items give different vectors (the pooling did not collapse to padding or a constant).
    v = be.hidden_states(samples[:2], "video_mean")
    assert not torch.allclose(v[0], v[1])


def test_video_mean_pools_exactly_the_video_token_positions(tmp_path_factory, clips):
    be = backend(tmp_path_factory, "qwen2_5_vl")
    samples = samples_of(clips[:2])
    x = be.inputs(samples)
    video_id = be.model.config.video_token_id
    # Qwen2.5-VL: one LLM token per 2x2 merged patch per temporal pair: t * h * w / 4 video tokens.
    expected_tokens = (x["video_grid_thw"].prod(-1) // 4).tolist()
    assert (x["input_ids"] == video_id).sum(1).tolist() == expected_tokens
    with torch.inference_mode():
        hs = be.model(**x, output_hidden_states=True).hidden_states
    vis = x["input_ids"] == video_id
    got = be.hidden_states(samples, "video_mean")
    for row in range(2):
        for layer in (0, 3):
            manual = hs[layer][row][vis[row]].mean(0)
            np.testing.assert_allclose(got[row, layer].numpy(), manual.numpy(), atol=1e-5)
        real = x["attention_mask"][row].bool()
        np.testing.assert_allclose(
            be.hidden_states(samples, "all_mean")[row, 2].numpy(), hs[2][row][real].mean(0).numpy(), atol=1e-5
        )
    assert be.hidden_states(samples, "last")[0, 1].numpy() == pytest.approx(hs[1][0, -1].numpy(), abs=1e-5)


def test_logits_are_computed_for_the_last_position_only(tmp_path_factory, clips):
    be = backend(tmp_path_factory, "qwen2_5_vl")
    seen = []
    handle = be.model.lm_head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        be.hidden_states(samples_of(clips[:2]), "video_mean")
    finally:
        handle.remove()
    assert seen and seen[0][1] == 1  # [B, 1, H] into the LM head, not [B, seq, H]


def test_qwen3_vl_prompt_carries_the_true_frame_times(tmp_path_factory, tmp_path):
    be = backend(tmp_path_factory, "qwen3_vl")
    times = [0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 1, 2, 3]
    clip = read_clip(write_test_video(tmp_path / "vfr.mp4", synth_frames(12, 32, 32), times=times), 4)
    text = be.processor.tokenizer.decode(be.inputs(samples_of([clip]))["input_ids"][0])
    # Frames at 0, 1, 2, 3 s; Qwen3-VL stamps each temporal pair with its mean time.
    assert "<0.5 seconds>" in text and "<2.5 seconds>" in text


def test_cover_and_title_modalities_on_a_vlm(tmp_path_factory):
    cover = backend(tmp_path_factory, "qwen2_5_vl", modality="cover")
    img = np.asarray(synth_frames(1, 40, 56)[0])
    v = cover.hidden_states([Sample(Item("1", "a", "a"), image=img)], "video_mean")
    assert v.shape == (1, 4, 32) and torch.isfinite(v).all()
    title = backend(tmp_path_factory, "qwen2_5_vl", modality="title")
    items = [Sample(Item("1", "a", "A person shoots an arrow")), Sample(Item("2", "b", "Toy Story"))]
    batched = title.hidden_states(items, "last")
    np.testing.assert_allclose(batched[1].numpy(), title.hidden_states(items[1:], "last")[0].numpy(), atol=1e-4)
    with pytest.raises(ExtractError, match="video_mean needs visual tokens"):
        title.hidden_states(items, "video_mean")


def test_text_lm_title_path(tmp_path_factory):
    be = TextBackend(
        str(tiny_checkpoint(tmp_path_factory, "text_lm")),
        prompt=PROMPTS["plain"],
        device="cpu",
        compute_dtype="float32",
    )
    items = [
        Sample(Item(str(i), t, t))
        for i, t in enumerate(["Toy Story (1995)", "A much longer title about a person and an arrow"])
    ]
    for pool in ("last", "all_mean"):
        batched = be.hidden_states(items, pool)
        assert batched.shape == (2, 3, 32)  # 2 layers + embeddings
        for i in range(2):
            np.testing.assert_allclose(batched[i].numpy(), be.hidden_states([items[i]], pool)[0].numpy(), atol=1e-4)
    assert len(be.generate(items, 3)) == 2


def test_storage_dtypes_round_trip_through_the_record_format():
    v = torch.randn(4, 8) * 3
    for dtype in records.DTYPES:
        data = to_storage_bytes(v, dtype)
        item_id, arr = records.decode_item(records.encode_item_bytes("x", data, dtype, (4, 8)))
        ref = v.to(getattr(torch, dtype)).float().numpy()
        np.testing.assert_array_equal(np.asarray(arr, np.float32), ref)
        assert str(arr.dtype) == dtype and item_id == "x"


def test_pooling_rejects_rows_without_tokens():
    hs = (torch.ones(1, 3, 2),)
    with pytest.raises(RuntimeError, match="no token to pool"):
        pool_hidden_states(hs, torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.bool), "video_mean")
    with pytest.raises(ExtractError, match="unknown --pool"):
        pool_hidden_states(hs, torch.ones(1, 3), None, "max")


def test_one_frame_clip_is_padded_for_qwen3(tmp_path_factory, clips):
    be = backend(tmp_path_factory, "qwen3_vl")
    one = dataclasses.replace(clips[3])
    assert len(one.frames) == 1
    assert be.hidden_states(samples_of([one]), "video_mean").shape == (1, 4, 32)


def test_max_pixels_caps_the_visual_token_count(tmp_path_factory, clips):
    path = str(tiny_checkpoint(tmp_path_factory, "qwen2_5_vl"))
    kw = dict(modality="video", prompt="x", device="cpu", compute_dtype="float32")
    video_id = None
    counts = []
    for cap in (None, 28 * 28 * 2):
        be = VisionLanguageBackend(path, max_pixels=cap, **kw)
        video_id = be.model.config.video_token_id
        counts.append(int((be.inputs(samples_of(clips[:1]))["input_ids"] == video_id).sum()))
    assert counts[1] < counts[0]
    with pytest.raises(ExtractError, match="--max-pixels applies to Qwen-VL"):
        VisionLanguageBackend(str(tiny_checkpoint(tmp_path_factory, "llava_onevision")), max_pixels=1000, **kw)
    # Below one merged token the processor failed on every item with a traceback (or said nothing at 100).
    for cap in (1, 100):
        with pytest.raises(ExtractError, match=rf"--max-pixels {cap} is less than one visual token \(784 pixels"):
            VisionLanguageBackend(path, max_pixels=cap, **kw)


def test_max_pixels_is_the_cover_budget_too(tmp_path_factory):
    # It was recorded in the run identity but left the cover's budget alone: the same features either way.
    path = str(tiny_checkpoint(tmp_path_factory, "qwen2_5_vl"))
    img = np.random.default_rng(0).integers(0, 255, (224, 336, 3), np.uint8)
    counts = []
    for cap in (None, 28 * 28 * 6):
        be = VisionLanguageBackend(
            path, modality="cover", prompt="x", device="cpu", compute_dtype="float32", max_pixels=cap
        )
        counts.append(be.prepare([Sample(Item("1", "a", "a"), image=img)]).visual_tokens[0])
    assert counts[1] <= 6 < counts[0]


def test_real_archery_clip_through_qwen3_vl(tmp_path_factory):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos" / "archery.mp4"
    if not path.is_file():
        pytest.skip("../shared/data/videos/archery.mp4 not present")
    be = backend(tmp_path_factory, "qwen3_vl")
    clip = read_clip(path, 16)
    text = be.processor.tokenizer.decode(be.inputs(samples_of([clip]))["input_ids"][0])
    assert text.count("seconds>") == 8  # 16 frames -> 8 temporal pairs, each stamped with its time
    v = be.hidden_states(samples_of([clip]), "video_mean")
    assert v.shape == (1, 4, 32) and torch.isfinite(v).all()


def test_a_mistyped_model_path_is_named_not_sent_to_the_hub(tmp_path):
    from extract.captions import TextEncoder
    from extract.models import check_location

    for flag, location in [("--model", str(tmp_path / "nope")), ("--model", "./models/x"), ("--model", "a/b/c")]:
        with pytest.raises(ExtractError, match=rf"{flag} {location}: no such file or folder \(and not a Hugging"):
            check_location(flag, location)
    check_location("--model", "Qwen/Qwen2.5-VL-7B-Instruct")  # a hub id passes to the hub client
    check_location("--model", str(tmp_path))  # an existing folder passes
    with pytest.raises(ExtractError, match=r"--text-encoder .*/missing-minilm: no such file or folder"):
        TextEncoder(str(tmp_path / "missing-minilm"))


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_flat_pictures_are_read_channels_last(tmp_path_factory, kind):
    # A picture 1 or 3 pixels high ([1, W, 3], [3, W, 3]) looked channels-first to the processors' guess: a
    # 1 x 1 placeholder cover got the patch grid of a 3 x 1 one. Its grid must be the one of its true shape.
    cover = backend(tmp_path_factory, kind, modality="cover")
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (3, 5), (3, 40)]:
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        x = cover.inputs([Sample(Item("1", "a", "a"), image=img)])
        expected = cover.processor.image_processor(images=[img], input_data_format="channels_last", return_tensors="pt")
        for key in ("image_grid_thw", "image_sizes", "pixel_values"):
            if key in expected:
                np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(expected[key]), err_msg=f"{key} {h}x{w}")


def test_the_decode_size_of_a_flat_clip_keeps_its_orientation(tmp_path_factory):
    be = backend(tmp_path_factory, "qwen2_5_vl", modality="video")
    h, w = be.frame_size(3, 40, 4)
    assert w > h  # read channels-first, the 3 x 40 clip was decoded to 112 x 28 (aspect ratio flipped)


@pytest.mark.parametrize("kind", ["text_lm", "qwen2_5_vl"])
def test_a_checkpoint_missing_weights_is_refused(tmp_path, tmp_path_factory, kind):
    # transformers initialises missing weights at random and only logs it: every feature would go through them.
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / kind
    shutil.copytree(tiny_checkpoint(tmp_path_factory, kind), folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.1." not in k}, folder / "model.safetensors")
    with pytest.raises(
        ExtractError, match=r"the checkpoint lacks \d+ weight\(s\) of the model, e\.g\. \[.*layers\.1\."
    ):
        if kind == "text_lm":
            TextBackend(str(folder), prompt=PROMPTS["plain"], device="cpu", compute_dtype="float32")
        else:
            VisionLanguageBackend(
                str(folder), modality="video", prompt=PROMPTS["rec"], device="cpu", compute_dtype="float32"
            )


@pytest.mark.parametrize("kind", ["text_lm", "qwen2_5_vl", "text_encoder"])
def test_a_truncated_weights_file_is_one_error(tmp_path, tmp_path_factory, kind):
    # safetensors' own error escaped every loader as a traceback.
    import shutil

    from extract.captions import TextEncoder

    folder = tmp_path / kind
    shutil.copytree(tiny_checkpoint(tmp_path_factory, kind), folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ExtractError, match=r"cannot read the weights \(.*\): a damaged or partial download"):
        if kind == "text_lm":
            TextBackend(str(folder), prompt=PROMPTS["plain"], device="cpu", compute_dtype="float32")
        elif kind == "text_encoder":
            TextEncoder(str(folder), device="cpu")
        else:
            VisionLanguageBackend(
                str(folder), modality="video", prompt=PROMPTS["rec"], device="cpu", compute_dtype="float32"
            )
