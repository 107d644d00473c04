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


def test_minicpmv_adapter_pools_its_language_model_layer_by_layer(tmp_path_factory):
    """The adapter's own pooling on a stand-in for the remote model: a real Qwen2 LM as `llm`, a fixed embedding
    merge, two `image_bound` ranges; equal to pooling all hidden states (the remote weights are not here)."""
    from extract_tiny import tiny_checkpoint
    from transformers import AutoModelForCausalLM

    from extract.adapters import MiniCPMVAdapter
    from extract.models import pool_hidden_states

    llm = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint(tmp_path_factory, "text_lm"))).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [0, 0, 6, 7, 8, 9, 10, 11]])
    mask = (torch.arange(8)[None] >= torch.tensor([[0], [2]])).long()
    with torch.inference_mode():
        embeds = llm.get_input_embeddings()(ids)

    class Remote:
        def get_vllm_embedding(self, data):
            return embeds, None

    Remote.llm = llm
    adapter = MiniCPMVAdapter.__new__(MiniCPMVAdapter)
    adapter.model, adapter.pooler = Remote(), None
    data = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "image_bound": [torch.tensor([[1, 4]]), torch.tensor([[3, 5], [6, 7]])],
    }
    adapter._inputs = lambda samples: data
    visual = torch.zeros(2, 8, dtype=torch.bool)
    visual[0, 1:4] = visual[1, 3:5] = visual[1, 6:7] = True
    with torch.inference_mode():
        hs = llm.model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=data["position_ids"], output_hidden_states=True
        ).hidden_states
    for pool in ("video_mean", "last"):
        got = adapter.hidden_states([None, None], pool)
        want = pool_hidden_states(hs, mask, visual, pool)
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6, rtol=0)
