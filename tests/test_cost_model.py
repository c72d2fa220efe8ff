"""The computed cost model agrees with a direct count on a toy shape."""

import pytest

from benchmarks.cost_model import layer_flops, prefill_flops, selection_flops
from benchmarks.selection_cost import SHAPES


def test_layer_flops_matches_a_direct_count():
    d, dq, dkv, inter, tokens = 8, 8, 4, 16, 5
    proj_macs = tokens * (d * dq + 2 * d * dkv + dq * d + 3 * d * inter)
    attn_macs = sum(2 * dq * (p + 1) for p in range(tokens))  # QK^T and AV over the causal prefix
    assert layer_flops(tokens, d, dq, dkv, inter) == pytest.approx(2 * (proj_macs + attn_macs))


def test_selection_is_cheaper_than_k_full_layers_and_prefill_scales_superlinearly():
    shape = SHAPES["7b"]
    d, heads, kv, inter, layers, vocab = shape
    n = 2944
    for k in (1, 2, 4):
        assert selection_flops(n, shape, k) < (k + 1) * layer_flops(n, d, d, d // heads * kv, inter)
    assert prefill_flops(2 * n, shape) > 2 * prefill_flops(n, shape) - 2 * d * vocab


def test_benchmarks_write_to_scratch_unless_told_to_update_the_committed_results(tmp_path, monkeypatch):
    import benchmarks.common as common
    from benchmarks.cost_model import main

    committed = (common.RESULTS / "cost_model_7b.md").read_text()
    monkeypatch.setattr(common, "SCRATCH", tmp_path / "scratch")
    main([])
    assert (tmp_path / "scratch" / "cost_model_7b.md").read_text().startswith("# Prefill FLOPs")
    assert (common.RESULTS / "cost_model_7b.md").read_text() == committed
    common.BenchmarkParser().parse_args(["--update-results"])
    assert common.results_dir() == common.RESULTS
    common.BenchmarkParser().parse_args([])
    assert common.results_dir() == tmp_path / "scratch"
