"""Extraction runs: CLI, failures, resume after interruption, sharding + merge, captions, errors, and
the end-to-end path into dff_jax (features loader and trainer)."""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("av")

from extract_tiny import synth_frames, tiny_checkpoint  # noqa: E402

from dff_jax import records  # noqa: E402
from extract import ExtractError  # noqa: E402
from extract.__main__ import main  # noqa: E402
from extract.merge import main as merge_main  # noqa: E402
from extract.merge import scan_shards  # noqa: E402
from extract.run import RunOptions, run  # noqa: E402
from extract.video import write_test_video  # noqa: E402

torch.set_num_threads(2)
GOOD = ["a1", "a2", "a3", "a4", "a5", "a6"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Six small clips (different lengths and sizes), one junk file, one item without a file."""
    d = tmp_path_factory.mktemp("media")
    for i, item in enumerate(GOOD):
        write_test_video(d / f"{item}.mp4", synth_frames(3 + i, 32 + 8 * (i % 2), 48, seed=i), fps=6)
    (d / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    (d / "items.csv").write_text("id,title\n" + "".join(f"{i},clip {i}\n" for i in GOOD + ["junk", "absent"]))
    return d


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "qwen2_5_vl"))


def cli(media, model, out, *extra):
    return main(
        [
            "--model",
            model,
            "--items",
            str(media / "items.csv"),
            "--media",
            str(media),
            "--out",
            str(out),
            "--frames",
            "4",
            "--device",
            "cpu",
            "--no-progress",
            *extra,
        ]
    )


def opts(media, model, out, **kw):
    kw.setdefault("allow_failures", True)  # the media fixture holds two items that always fail
    return RunOptions(
        items=str(media / "items.csv"),
        out=str(out),
        model=model,
        media=str(media),
        frames=4,
        device="cpu",
        progress=False,
        **kw,
    )


def read_all(out):
    return {i: a for p in records.shard_files(out) for i, a in map(records.decode_item, records.iter_records(p))}


def test_cli_video_run_records_failures_and_loads_into_dff_jax(media, qwen, tmp_path, capsys):
    out = tmp_path / "feat"
    # Failed items keep the folder unfinished: one error line naming the folder and the items, exit 2.
    assert cli(media, qwen, out, "--batch-size", "4", "--flush-every", "4") == 2
    captured = capsys.readouterr()
    assert "6 extracted, 2 failed" in captured.out and "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(out) in errors[0] and "junk (decode: cannot open" in errors[0]
    assert "absent (decode: missing file" in errors[0] and "--allow-failures" in errors[0]
    assert not (out / records.SCHEMA_FILE).exists() and not (out / "manifest.json").exists()
    assert sorted(read_all(out)) == GOOD  # nothing lost: the written items stay, the shard is done
    # Asked for by flag: the rerun retries the two (they fail again) and finalises, listing them.
    assert cli(media, qwen, out, "--batch-size", "4", "--flush-every", "4", "--allow-failures") == 0
    assert "0 extracted, 2 failed, 6 already done" in capsys.readouterr().out
    schema = records.read_schema(out)
    assert (schema.layers, schema.hidden_size, schema.dtype, schema.num_items) == (4, 32, "bfloat16", 6)
    assert (
        schema.pooling == "video_mean"
        and schema.num_frames == 4
        and schema.prompt.startswith("You are watching a micro-video")
    )
    failures = {r["item_id"]: r for r in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    assert set(failures) == {"junk", "absent"}
    assert "cannot open" in failures["junk"]["reason"] and "missing file" in failures["absent"]["reason"]
    assert len(records.shard_files(out)) == 2  # 6 items, 4 per file
    # The merge records each shard's digest; load_features below checks the shards against it.
    assert schema.extra[records.SHARD_DIGESTS] == {p.name: records.shard_digest(p) for p in records.shard_files(out)}
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["items_written"] == 6 and manifest["items_failed"] == 2 and manifest["shards"][0]["versions"]["torch"]
    )
    assert manifest["allow_failures"] and [(f["item_id"], f["stage"]) for f in manifest["failed_items"]] == [
        ("junk", "decode"),
        ("absent", "decode"),
    ]
    assert "missing file" in manifest["failed_items"][1]["reason"] and schema.extra["failed_items"] == 2

    from dff_jax.features import load_features

    table = load_features(out, [""] + GOOD + ["junk"], allow_missing=True)
    assert table.table.shape == (8, 4, 32) and table.missing == 1
    assert str(table.table.dtype) == "bfloat16"
    assert np.asarray(table.table[1], np.float32).any() and not np.asarray(table.table[7], np.float32).any()


def test_resume_after_interruption_writes_every_item_once(media, qwen, tmp_path):
    out = tmp_path / "feat"

    def stop_after_two(written):
        if written >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(opts(media, qwen, out, batch_size=2, flush_every=1), on_batch=stop_after_two)
    first = read_all(out)
    assert sorted(first) == ["a1", "a2"]  # the finished batch was flushed on the interruption
    assert json.loads((out / "manifest-part-00000-of-00001.json").read_text())["status"] == "interrupted"
    assert not (out / records.SCHEMA_FILE).exists()  # incomplete folders get no schema
    # A kill -9 leaves the open part as .tmp: ignored and cleaned by the next run.
    (out / "part-00000-of-00001-000099.tfrecord.tmp").write_bytes(b"half")
    manifest = run(opts(media, qwen, out, batch_size=2, flush_every=1))
    assert manifest["already_done"] == 2 and manifest["extracted"] == 4 and manifest["folder_complete"]
    assert not list(out.glob("*.tmp"))
    ids, _, _ = scan_shards(out)  # raises on an item written twice
    assert sorted(ids) == GOOD
    again = run(opts(media, qwen, out, batch_size=2))
    assert again["extracted"] == 0 and again["already_done"] == 6
    # Resumed vectors equal an uninterrupted run's.
    ref = tmp_path / "ref"
    run(opts(media, qwen, ref, batch_size=3))
    got, want = read_all(out), read_all(ref)
    for k in GOOD:
        np.testing.assert_allclose(
            np.asarray(got[k], np.float32), np.asarray(want[k], np.float32), rtol=0.02, atol=1e-3
        )


def test_shards_merge_into_one_feature_set(media, qwen, tmp_path, capsys):
    out = tmp_path / "feat"
    m0 = run(opts(media, qwen, out, shard=(0, 2), dtype="float32"))
    assert m0["items_in_shard"] == 4 and not m0["folder_complete"]
    assert merge_main(["--out", str(out)]) == 1
    assert "INCOMPLETE" in capsys.readouterr().out
    m1 = run(opts(media, qwen, out, shard=(1, 2), dtype="float32"))
    assert m1["folder_complete"]
    assert merge_main(["--out", str(out)]) == 1  # two items failed: not finalised without the flag
    assert "INCOMPLETE: " in capsys.readouterr().out
    assert merge_main(["--out", str(out), "--allow-failures"]) == 0
    assert merge_main(["--out", str(out), "--strict", "--allow-failures"]) == 2
    assert sorted(read_all(out)) == GOOD and records.read_schema(out).num_items == 6
    single = tmp_path / "single"
    run(opts(media, qwen, single, dtype="float32"))
    a, b = read_all(out), read_all(single)
    for k in GOOD:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5)


def test_a_folder_refuses_a_different_extraction(media, qwen, tmp_path):
    out = tmp_path / "feat"
    run(opts(media, qwen, out))
    with pytest.raises(ExtractError, match="prompt_name: 'rec' there vs 'plain' now"):
        run(opts(media, qwen, out, prompt="plain"))


def test_cli_errors_are_one_line_and_exit_2(media, qwen, tmp_path, capsys, tmp_path_factory):
    assert (
        main(
            [
                "--model",
                qwen,
                "--items",
                str(tmp_path / "none.csv"),
                "--out",
                str(tmp_path / "o"),
                "--modality",
                "title",
            ]
        )
        == 2
    )
    assert "none.csv: item list not found" in capsys.readouterr().err
    assert cli(media, qwen, tmp_path / "o", "--pool", "max") == 2
    assert "unknown --pool 'max'" in capsys.readouterr().err
    assert cli(media, qwen, tmp_path / "o", "--modality", "audio") == 2
    assert "unknown --modality 'audio'" in capsys.readouterr().err
    assert cli(media, qwen, tmp_path / "o", "--max-pixels", "-5") == 2
    assert "--max-pixels must be >= 1 (pixels per frame), not -5" in capsys.readouterr().err
    assert cli(media, qwen, tmp_path / "o", "--device", "tpu") == 2
    assert "--device 'tpu': not a torch device" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("id,title\n1,a\n1,b\n")
    assert main(["--model", qwen, "--items", str(bad), "--out", str(tmp_path / "o2"), "--modality", "title"]) == 2
    assert "bad.csv: line 3: duplicate item id" in capsys.readouterr().err
    assert main(["--model", qwen, "--items", str(media / "items.csv"), "--out", str(bad), "--modality", "title"]) == 2
    assert f"--out {bad}: is a file; expected the output folder" in capsys.readouterr().err
    missing = str(tmp_path / "no-such-model")  # a mistyped path, not sent to the hub as an id
    assert (
        main(
            [
                "--model",
                missing,
                "--items",
                str(media / "items.csv"),
                "--out",
                str(tmp_path / "o4"),
                "--modality",
                "title",
            ]
        )
        == 2
    )
    assert f"--model {missing}: no such file or folder (and not a Hugging Face hub id" in capsys.readouterr().err
    text_lm = str(tiny_checkpoint(tmp_path_factory, "text_lm"))  # a tokenizer but no video processor
    assert cli(media, text_lm, tmp_path / "o3") == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (earlier lines: the fixture's checkpoint-build progress bar)
    assert last.startswith("error: ") and "Traceback" not in err and text_lm in last


def test_title_modality_with_a_text_lm(media, tmp_path, tmp_path_factory):
    model = str(tiny_checkpoint(tmp_path_factory, "text_lm"))
    out = tmp_path / "title"
    assert (
        main(
            [
                "--model",
                model,
                "--items",
                str(media / "items.csv"),
                "--modality",
                "title",
                "--out",
                str(out),
                "--batch-size",
                "3",
                "--device",
                "cpu",
                "--no-progress",
                "--dtype",
                "float16",
            ]
        )
        == 0
    )
    schema = records.read_schema(out)
    assert (schema.layers, schema.hidden_size, schema.dtype, schema.pooling, schema.num_items) == (
        3,
        32,
        "float16",
        "all_mean",
        8,
    )


def test_caption_centric_features(media, qwen, tmp_path, tmp_path_factory):
    encoder = str(tiny_checkpoint(tmp_path_factory, "text_encoder"))
    out = tmp_path / "cc"
    assert (
        cli(
            media,
            qwen,
            out,
            "--captions",
            "--text-encoder",
            encoder,
            "--caption-tokens",
            "4",
            "--batch-size",
            "3",
            "--dtype",
            "float32",
            "--allow-failures",
        )
        == 0
    )
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [c["item_id"] for c in captions] == GOOD
    vectors = read_all(out)
    schema = records.read_schema(out)
    assert (schema.layers, schema.hidden_size, schema.pooling, schema.model) == (1, 24, "caption_mean", encoder)
    assert schema.extra["caption_model"] == qwen
    # The tiny encoder's modules.json lists Normalize: unit vectors, as sentence-transformers gives.
    assert np.allclose([np.linalg.norm(v) for v in vectors.values()], 1.0, atol=1e-5)
    # Caption-free baseline: the item text itself embedded (no LVLM).
    out2 = tmp_path / "text"
    assert (
        main(
            [
                "--items",
                str(media / "items.csv"),
                "--out",
                str(out2),
                "--modality",
                "title",
                "--captions",
                "--caption-source",
                "title",
                "--text-encoder",
                encoder,
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    assert records.read_schema(out2).num_items == 8
    # Without --modality title (and with a --model it never loads), the schema said "video" with frames.
    out3 = tmp_path / "text_default_modality"
    args = ["--items", str(media / "items.csv"), "--out", str(out3), "--captions", "--caption-source", "title"]
    assert main([*args, "--model", qwen, "--text-encoder", encoder, "--device", "cpu", "--no-progress"]) == 0
    schema = records.read_schema(out3)
    assert (schema.modality, schema.num_frames, schema.extra["caption_model"]) == ("title", 0, None)
    assert read_all(out3).keys() == read_all(out2).keys()
    assert all(np.array_equal(read_all(out3)[k], v) for k, v in read_all(out2).items())


@pytest.mark.slow  # ~1 min, nearly all of it the trainer's JIT compile; the only test of the whole path
def test_extract_then_train(tmp_path, tmp_path_factory):
    """python -m extract on a folder of mp4 files, then dff_jax training on the produced features."""
    train = pytest.importorskip("dff_jax.train")
    from configs import smoke

    num_items, rng = 16, np.random.default_rng(0)
    media = tmp_path / "media"
    media.mkdir()
    ids = [f"v{i}" for i in range(1, num_items + 1)]
    for i, item in enumerate(ids):
        write_test_video(media / f"{item}.mp4", synth_frames(4, 32, 32, seed=i), fps=4)
    (media / "items.csv").write_text("id,title\n" + "".join(f"{i},clip {i}\n" for i in ids))
    model = str(tiny_checkpoint(tmp_path_factory, "llava_onevision"))
    feats = tmp_path / "features"
    assert (
        main(
            [
                "--model",
                model,
                "--items",
                str(media / "items.csv"),
                "--media",
                str(media),
                "--out",
                str(feats),
                "--frames",
                "4",
                "--batch-size",
                "8",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for u in range(60):  # MicroLens pairs format: user<TAB>items in time order
        seq = rng.choice(ids, size=int(rng.integers(5, 9)), replace=False)
        lines.append(f"u{u}\t{' '.join(seq)}")
    (data / "pairs.tsv").write_text("\n".join(lines) + "\n")
    c = smoke.get_config()
    c.data.dir = str(data)
    c.data.interactions = "pairs.tsv"
    c.data.format = "microlens_tsv"
    c.data.generate = ""
    c.features.dir = str(feats)
    c.train.num_epochs = 1
    c.eval.ks = (5, 10)  # 16 items: HR@20 would be 1 for every target, which training refuses
    result = train.train_and_evaluate(c, tmp_path / "run")
    flat = json.dumps(result)
    assert "NDCG@10" in flat and "nan" not in flat.lower()


def test_a_multi_line_error_is_printed_as_one_line(media, tmp_path, capsys, monkeypatch):
    import extract.run

    def hub_like_failure(opts):  # the hub client's messages span lines
        raise ExtractError("org/none: no model config could be loaded (OSError: We couldn't connect.\nCheck it.)")

    monkeypatch.setattr(extract.run, "run", hub_like_failure)
    assert main(["--model", "org/none", "--items", str(media / "items.csv"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == "error: org/none: no model config could be loaded (OSError: We couldn't connect. Check it.)\n"


def test_bad_numbers_are_refused_before_the_model_loads(media, qwen, tmp_path, capsys):
    out = tmp_path / "o"
    for value in ("nan", "inf", "1e308", "-1", "0.5"):
        assert cli(media, qwen, out, "--decode-scale", value) == 2
        assert f"--decode-scale {float(value)}: expected 0 (full size) or a finite number" in capsys.readouterr().err
    assert cli(media, qwen, out, "--frames", "100000") == 2
    assert "--frames 100000: expected at most 1024 frames" in capsys.readouterr().err
    encoder = str(tmp_path / "enc")  # never loaded: refused first
    assert cli(media, qwen, out, "--captions", "--text-encoder", encoder, "--caption-tokens", "0") == 2
    assert "--caption-tokens must be >= 1, not 0" in capsys.readouterr().err
    assert not out.exists()  # nothing written, not even a run_config.json to freeze the typo into


@pytest.mark.parametrize("argv", [["--frames", "x"], ["--no-such-flag"]])
def test_argument_errors_are_one_error_line(media, qwen, tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli(media, qwen, tmp_path / "o", *argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: python -m extract: ")
    with pytest.raises(SystemExit) as e:
        merge_main(["--out", str(tmp_path), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: python -m extract.merge: ")


def test_ids_that_are_not_file_names_are_refused_with_media(media, qwen, tmp_path, capsys):
    items = tmp_path / "paths.csv"
    for bad in ("../../etc/x", "/abs/path", ".."):
        items.write_text(f"id,title\na1,ok\n{bad},b\n")
        args = ["--model", qwen, "--items", str(items), "--media", str(media), "--out", str(tmp_path / "o")]
        assert main([*args, "--device", "cpu", "--no-progress"]) == 2
        assert f"paths.csv: line 3: item id {bad!r} cannot name a file in --media" in capsys.readouterr().err
    # Too long for a file name: opening it raised ENAMETOOLONG, which stopped every run (and resume) at it.
    items.write_text(f"id,title\na1,ok\n{'x' * 300},b\n")
    assert main([*args, "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "paths.csv: line 3: item id 'xxxx" in err and "(300 bytes) cannot name a file in --media" in err
    assert "Traceback" not in err


def text_cli(model, items, out, *extra):
    args = ["--model", model, "--items", str(items), "--modality", "title", "--out", str(out), "--device", "cpu"]
    return main([*args, "--no-progress", *extra])


def test_empty_titles_are_refused_in_the_title_modality(tmp_path, tmp_path_factory, capsys):
    model = str(tiny_checkpoint(tmp_path_factory, "text_lm"))
    items = tmp_path / "items.csv"
    for content in ("id,title\n1,\n2,Heat\n", "1,\n2,Heat\n"):
        items.write_text(content)
        assert text_cli(model, items, tmp_path / "o") == 2
        line = 2 if content.startswith("id") else 1
        assert f"1 item(s) have an empty title: '1' (line {line})" in capsys.readouterr().err
    assert not (tmp_path / "o" / "run_config.json").exists()


def test_a_resume_with_another_item_list_is_refused_before_loading(tmp_path, tmp_path_factory, capsys, monkeypatch):
    model = str(tiny_checkpoint(tmp_path_factory, "text_lm"))
    first, other, out = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "feat"
    first.write_text("id,title\ngood,Toy Story\ngood2,Heat\n")
    other.write_text("id,title\nx1,Alien\nx2,Brazil\n")
    assert text_cli(model, first, out) == 0
    capsys.readouterr()
    import extract.run as run_module

    monkeypatch.setattr(run_module, "build_backend", lambda opts: pytest.fail("the model was loaded"))
    assert text_cli(model, other, out) == 2
    err = capsys.readouterr().err
    assert f"{out}: holds 2 written item(s) not in --items {other}" in err and "'good'" in err
    assert records.read_schema(out).num_items == 2 and len(read_all(out)) == 2  # the folder is untouched


def test_a_shard_or_resume_with_other_texts_for_the_same_ids_is_refused(tmp_path, tmp_path_factory, capsys):
    # The list's path is per host, so only the ids were compared: two shards embedding different titles for the
    # same ids made one "complete" folder of mixed features.
    model = str(tiny_checkpoint(tmp_path_factory, "text_lm"))
    a, b, c, out = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv", tmp_path / "feat"
    a.write_text("id,title\n1,Toy Story\n2,Heat\n3,Alien\n4,Brazil\n")
    b.write_text("id,title\n1,Toy Story\n2,Heat\n3,Aliens\n4,Brazil\n")
    c.write_text(a.read_text() + "5,Fargo\n")
    assert text_cli(model, a, out, "--shard", "0/2") == 0
    capsys.readouterr()
    assert text_cli(model, b, out, "--shard", "1/2") == 2
    err = capsys.readouterr().err
    assert f"{b}: line 4: item '3' has another text than the one this folder was extracted with" in err
    assert merge_main(["--out", str(out), "--items", str(b)]) == 2
    assert "line 4: item '3' has another text" in capsys.readouterr().err
    # The same texts from a copy elsewhere, or a list that adds items, go on.
    assert text_cli(model, c, out, "--shard", "1/2") == 0
    assert text_cli(model, c, out, "--shard", "0/2") == 0
    assert records.read_schema(out).num_items == 5


def test_a_shard_with_weights_changed_in_place_is_refused(tmp_path, tmp_path_factory, capsys):
    # The model's identity was its path: weights rewritten there (or another snapshot of a hub id) mixed in.
    from safetensors.torch import load_file, save_file

    model = tmp_path / "lm"
    shutil.copytree(tiny_checkpoint(tmp_path_factory, "text_lm"), model)
    items, out = tmp_path / "a.csv", tmp_path / "feat"
    items.write_text("id,title\n1,Toy Story\n2,Heat\n3,Alien\n")
    assert text_cli(str(model), items, out, "--shard", "0/2") == 0
    assert json.loads((out / "run_config.json").read_text())["model_files"]
    save_file({k: v * 1.5 for k, v in load_file(model / "model.safetensors").items()}, model / "model.safetensors")
    capsys.readouterr()
    assert text_cli(str(model), items, out, "--shard", "1/2") == 2
    err = capsys.readouterr().err
    assert "this folder holds a different extraction (model_files: '" in err and "Traceback" not in err


def test_merged_files_contradicting_the_records_go_when_finalize_refuses(tmp_path, tmp_path_factory):
    from extract.merge import finalize

    model = str(tiny_checkpoint(tmp_path_factory, "text_lm"))
    items, out = tmp_path / "a.csv", tmp_path / "feat"
    items.write_text("id,title\ngood,Toy Story\ngood2,Heat\n")
    assert text_cli(model, items, out) == 0
    # A record of an unknown item (the audit's resume with another list, done before it was refused).
    with records.ShardWriter(out / "part-00000-of-00001-000009.tfrecord") as w:
        w.write_bytes("stray", np.zeros((3, 32), np.float32).tobytes(), "float32", (3, 32))
    with pytest.raises(ExtractError, match="1 written item"):
        finalize(out, ["good", "good2"])
    assert not (out / records.SCHEMA_FILE).exists() and not (out / "manifest.json").exists()
    # A damaged shard of a finalised folder: the merge's error came before the removal, the schema stayed.
    (out / "part-00000-of-00001-000009.tfrecord").unlink()
    assert finalize(out, ["good", "good2"]).complete and (out / records.SCHEMA_FILE).exists()
    shard = records.shard_files(out)[0]
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(records.RecordError, match="truncated"):
        finalize(out, ["good", "good2"])
    assert not (out / records.SCHEMA_FILE).exists() and not (out / "manifest.json").exists()


def test_merge_refuses_a_shard_of_another_run(tmp_path, tmp_path_factory, capsys):
    model = str(tiny_checkpoint(tmp_path_factory, "text_lm"))
    items, rec, plain = tmp_path / "a.csv", tmp_path / "rec", tmp_path / "plain"
    items.write_text("id,title\n1,Toy Story\n2,Heat\n3,Alien\n")
    assert text_cli(model, items, rec, "--shard", "0/2") == 0
    assert text_cli(model, items, plain, "--shard", "1/2", "--prompt", "plain") == 0
    capsys.readouterr()
    for p in [*plain.glob("part-*"), *plain.glob("manifest-part-*")]:
        shutil.copy(p, rec / p.name)
    assert merge_main(["--out", str(rec)]) == 2
    err = capsys.readouterr().err
    assert "manifest-part-00001-of-00002.json: this shard was extracted by another run" in err
    assert "prompt_name 'plain' vs 'rec'" in err and not (rec / records.SCHEMA_FILE).exists()
    # Without its manifest's run config (or without its manifest: the audit's case, merged silently before), the
    # part file is still not one this folder's runs wrote.
    path = rec / "manifest-part-00001-of-00002.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "run_config"}))
    assert merge_main(["--out", str(rec)]) == 2
    err = capsys.readouterr().err
    assert "part-00001-of-00002-000000.tfrecord: this part file is not one this folder's runs wrote" in err
    path.unlink()
    assert merge_main(["--out", str(rec)]) == 2 and "is not one this folder's runs wrote" in capsys.readouterr().err
    # A resume refuses it too, before any item; removed, its items are extracted again under this run.
    assert text_cli(model, items, rec, "--shard", "1/2") == 2
    assert "is not one this folder's runs wrote" in capsys.readouterr().err
    for p in rec.glob("part-00001-of-00002-*"):
        p.unlink()
    assert text_cli(model, items, rec, "--shard", "1/2") == 0 and records.read_schema(rec).num_items == 3


@pytest.mark.parametrize("content, says", [("[1]", "found a list"), ("{}", "missing model, modality")])
def test_a_run_config_that_is_not_this_extractors_is_one_error(tmp_path, tmp_path_factory, capsys, content, says):
    model = str(tiny_checkpoint(tmp_path_factory, "text_lm"))
    items, out = tmp_path / "a.csv", tmp_path / "feat"
    items.write_text("id,title\n1,Toy Story\n")
    out.mkdir()
    (out / "run_config.json").write_text(content)
    assert merge_main(["--out", str(out)]) == 2
    assert f"run_config.json: expected the JSON object this extractor writes ({says}" in capsys.readouterr().err
    assert text_cli(model, items, out) == 2
    assert f"run_config.json: expected the JSON object this extractor writes ({says}" in capsys.readouterr().err


def test_two_first_runs_cannot_both_define_the_folder(tmp_path, monkeypatch):
    from pathlib import Path

    from extract.run import _check_run_config

    out = tmp_path / "feat"
    out.mkdir()
    cfg = {"model": "m", "modality": "title", "prompt_name": "rec", "prompt_text": "x", "pool": "last"}
    cfg.update(dtype="float32", num_frames=0, items="a.csv")
    _check_run_config(out, cfg, write=True)
    # The second first run also finds no file (the race window): its write must not replace the first one's.
    exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self: self.name != "run_config.json" and exists(self))
    with pytest.raises(ExtractError, match="prompt_name: 'rec' there vs 'plain' now"):
        _check_run_config(out, {**cfg, "prompt_name": "plain"}, write=True)
    assert json.loads((out / "run_config.json").read_text())["prompt_name"] == "rec"
    assert not list(out.glob("*.tmp"))


def test_a_title_longer_than_the_context_is_the_items_failure(tmp_path, tmp_path_factory, capsys):
    # Positions past max_position_embeddings were run silently; the item's states are not features then.
    model = str(tiny_checkpoint(tmp_path_factory, "text_lm"))
    from transformers import AutoConfig

    context = AutoConfig.from_pretrained(model).max_position_embeddings
    items = tmp_path / "items.csv"
    items.write_text(f"id,title\nshort,Toy Story\nlong,{' '.join(['arrow'] * (context + 10))}\nlast,Heat\n")
    out = tmp_path / "feat"
    assert text_cli(model, items, out, "--batch-size", "3") == 2
    err = capsys.readouterr().err
    assert "1 item(s) failed: long (model: ValueError:" in err and f"the model's context of {context}" in err
    written = {i for p in records.shard_files(out) for i, _ in map(records.decode_item, records.iter_records(p))}
    assert written == {"short", "last"}  # the batch was retried one by one: the others are kept


def test_a_folder_written_before_part_files_were_listed_is_adopted(tmp_path, tmp_path_factory, capsys):
    model = str(tiny_checkpoint(tmp_path_factory, "text_lm"))
    items, out = tmp_path / "a.csv", tmp_path / "feat"
    items.write_text("id,title\n1,Toy Story\n2,Heat\n3,Alien\n")
    assert text_cli(model, items, out, "--shard", "0/2") == 0
    for p in out.glob("files-part-*.jsonl"):
        p.unlink()  # as an older extractor left it
    assert text_cli(model, items, out, "--shard", "1/2") == 0 and records.read_schema(out).num_items == 3
    listed = [json.loads(line)["file"] for p in out.glob("files-part-*.jsonl") for line in p.read_text().splitlines()]
    assert sorted(listed) == sorted(p.name for p in records.shard_files(out))
