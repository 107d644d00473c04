"""The adapter interface: a user adapter plugged in by `module:Class`, and the MiniCPM-V guard."""

import json
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from dff_jax import records  # noqa: E402
from extract import ExtractError  # noqa: E402
from extract.run import RunOptions, build_backend, run  # noqa: E402

ADAPTER_SOURCE = '''
import torch

class ConstantAdapter:
    """Layer l of item i is filled with 100 * i + l: tells whether the run stored the right rows."""

    def __init__(self, model, *, modality, num_frames, prompt, device, compute_dtype, trust_remote_code):
        self.model = model

    def hidden_states(self, samples, pool):
        rows = [torch.arange(3, dtype=torch.float32)[:, None].repeat(1, 5) + 100 * int(s.item.item_id) for s in samples]
        return torch.stack(rows)

    def generate(self, samples, max_new_tokens):
        return [s.item.title for s in samples]
'''


def test_user_adapter_runs_through_the_whole_pipeline(tmp_path, monkeypatch):
    (tmp_path / "my_adapter.py").write_text(ADAPTER_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "items.csv").write_text("id,title\n1,a\n2,b\n3,c\n")
    out = tmp_path / "feat"
    opts = RunOptions(
        items=str(tmp_path / "items.csv"),
        out=str(out),
        model="any",
        modality="title",
        adapter="my_adapter:ConstantAdapter",
        dtype="float32",
        batch_size=2,
        device="cpu",
        progress=False,
    )
    manifest = run(opts)
    assert manifest["extracted"] == 3 and manifest["folder_complete"]
    got = {i: a for p in records.shard_files(out) for i, a in map(records.decode_item, records.iter_records(p))}
    np.testing.assert_array_equal(got["2"][:, 0], [200, 201, 202])
    assert json.loads((out / "run_config.json").read_text())["adapter"] == "my_adapter:ConstantAdapter"
    sys.modules.pop("my_adapter", None)


def test_minicpmv_checkpoints_need_the_remote_code_flag(tmp_path):
    model = tmp_path / "minicpmv26"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "minicpmv", "version": 2.6}))
    (tmp_path / "items.csv").write_text("id,title\n1,a\n")
    opts = RunOptions(
        items=str(tmp_path / "items.csv"),
        out=str(tmp_path / "o"),
        model=str(model),
        media=str(tmp_path),
        device="cpu",
        pool="video_mean",
    )
    with pytest.raises(ExtractError, match="pass --trust-remote-code"):
        build_backend(opts)
    opts.adapter = "no_such_module:X"
    with pytest.raises(ExtractError, match="cannot import"):
        build_backend(opts)


FLAKY_SOURCE = '''
import torch

class BatchShyAdapter:
    """Fails on any batch of more than one item: every batch must fall back to one by one."""

    def __init__(self, model, **kw):
        pass

    def hidden_states(self, samples, pool):
        if len(samples) > 1:
            raise RuntimeError("batch too large")
        return torch.ones(1, 2, 3)

    def generate(self, samples, max_new_tokens):
        return ["x"] * len(samples)
'''


def test_batch_fallbacks_are_counted_and_logged(tmp_path, monkeypatch, capsys):
    (tmp_path / "shy_adapter.py").write_text(FLAKY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "items.csv").write_text("id,title\n1,a\n2,b\n3,c\n4,d\n5,e\n")
    opts = RunOptions(
        items=str(tmp_path / "items.csv"),
        out=str(tmp_path / "feat"),
        model="any",
        modality="title",
        adapter="shy_adapter:BatchShyAdapter",
        batch_size=2,
        device="cpu",
        progress=False,
    )
    manifest = run(opts)
    assert manifest["extracted"] == 5 and manifest["batch_fallbacks"] == 2  # batches of 2, 2 and 1
    err = capsys.readouterr().err
    assert err.count("warning: a batch of 2 items failed (RuntimeError: batch too large)") == 2
    sys.modules.pop("shy_adapter", None)
