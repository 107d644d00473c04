"""The benchmark runs end to end at a tiny shape and reports what it measured (the real shapes are run by hand)."""

import math

import pytest

from dff_jax import bench

TINY = {"num_users": 96, "num_items": 40, "layers": 3, "hidden": 16, "embed_dim": 16, "batch_size": 32}


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_bench_reports_train_eval_memory_and_the_torch_ratio(compute_dtype):
    # Asked for the PyTorch comparison in both dtypes: the bench makes it only for the float32 step.
    r = bench.run("cpu", TINY, steps=2, variant="dff", torch_compare=True, compute_dtype=compute_dtype)
    assert r["compute_dtype"] == compute_dtype and r["shape"]["num_items"] == 40
    train = r["train"]
    assert train["steps_per_epoch"] == math.ceil(96 / 32) and train["step_ms"] > 0 and train["epoch_s"] > 0
    assert math.isfinite(train["final_loss"]) and train["final_loss"] > 0
    ev = r["eval"]
    assert ev["users"] == 96 and ev["ranking_s"] > 0 and ev["bare_matmul_s"] > 0
    assert ev["ranking_over_matmul"] > 0  # (the ratio of the unrounded times)
    assert r["memory"]["host_peak_rss_bytes"] > 0
    if compute_dtype == "float32":
        t = r["torch_eager"]
        assert len(t["jax_step_ms_per_round"]) == len(t["torch_step_ms_per_round"]) == t["rounds"]
        assert r["jax_over_torch_throughput"] == t["jax_over_torch_throughput"] > 0
    else:
        assert "torch_eager" not in r


def test_feature_load_bench_small_shape(tmp_path):
    """`--what features` runs end to end at a tiny shape (the full MicroLens shape is run by hand)."""
    result = bench.bench_feature_load(num_items=50, layers=3, hidden=16, dtype="float16", tmpdir=str(tmp_path))
    assert result["table_bytes"] == 51 * 3 * 16 * 2
    assert result["peak_rss_bytes"] >= result["baseline_rss_bytes"] > 0
    assert result["seconds"] > 0 and result["ratio"] > 1
    assert list(tmp_path.iterdir()) == [], "the benchmark deletes what it wrote"
