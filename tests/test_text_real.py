"""The real sentence encoder (paraphrase-MiniLM-L3 in ../shared) on SST-2: FFN groups, token
statistics without padding, embedding metrics, and compression."""

from __future__ import annotations

import numpy as np
import pytest

import onnxprune
from onnxprune import embedding
from onnxprune.calibration.collect import collect
from onnxprune.calibration.requests import StatRequest
from onnxprune.data.samples import open_samples
from onnxprune.graph.groups import find_channel_groups
from onnxprune.model import load_model
from onnxprune.pipeline import Recipe
from onnxprune.runtime import make_session, run_batches

pytestmark = pytest.mark.real

FFN = "/model/model.0/auto_model/encoder/layer.{}/intermediate/dense/MatMul"
HEADS = "/model/model.0/auto_model/encoder/layer.{}/attention/output/dense/MatMul/heads"


@pytest.fixture(scope="module")
def minilm(shared):
    return load_model(shared / "models" / "minilm_l3_paraphrase.onnx")


@pytest.fixture(scope="module")
def sst2(shared):
    return dict(np.load(shared / "data" / "text" / "sst2_test.npz"))


def _rows(data: dict, rows) -> dict:
    return {k: v[rows] for k, v in data.items()}


def test_three_ffn_blocks_and_three_attention_blocks_are_prunable_groups(minilm):
    groups = [g for g in find_channel_groups(minilm) if g.skip is None]
    ffn = [(g.name, g.channels, g.axis) for g in groups if g.structure == "last-axis"]
    assert ffn == [(FFN.format(i), 1536, -1) for i in range(3)]
    heads = [(g.name, g.channels, g.unit, len(g.shape_entries)) for g in groups if g.structure == "heads"]
    assert heads == [(HEADS.format(i), 384, 32, 4) for i in range(3)]


def test_padding_is_left_out_of_the_token_statistics(minilm, sst2):
    """The same 16 sentences at the stored L = 64 and cut to their longest row give the same
    statistics at the FFN sites (the GELU output and the FFN input)."""
    data = _rows(sst2, slice(0, 16))
    longest = int(data["attention_mask"].sum(axis=1).max())
    assert longest < 64
    cut = {"input_ids": data["input_ids"][:, :longest], "attention_mask": data["attention_mask"][:, :longest]}
    groups = [g for g in find_channel_groups(minilm) if g.skip is None and g.structure == "last-axis"]
    requests = [StatRequest(groups[0].site, axis=-1),
                StatRequest("/model/model.0/auto_model/encoder/layer.0/attention/output/LayerNorm/"
                            "LayerNormalization_output_0", axis=-1)]
    stats = [collect(minilm, {"target": open_samples({k: v for k, v in d.items()}, minilm)}, requests,
                     progress=False) for d in (data, cut)]
    for request in requests:
        a, b = (s.moments(request) for s in stats)
        assert a.count == b.count == int(data["attention_mask"].sum())
        np.testing.assert_allclose(a.second_moment, b.second_moment, rtol=2e-4, atol=1e-6)


@pytest.mark.slow
def test_ffn_pruning_and_low_rank_keep_the_sentence_embedding(minilm, sst2):
    calib, held = _rows(sst2, slice(0, 200)), _rows(sst2, slice(910, 1110))
    ffn = tuple(FFN.format(i) for i in range(3))         # the FFN units only (heads: their own test)
    prune = Recipe(passes=(("select-nodes", {"criterion": "spectral", "fraction": 0.5, "groups": ffn}),
                           ("reconstruct-next-layer", {})), calib_size=None)
    result = onnxprune.compress(minilm, calib, eval_data=held, recipe=prune, measure_latency=False, progress=False)
    v = result.report["validation"]
    e = v["embedding"]
    assert e["output"] == "461" and e["samples"] == 200
    assert e["cosine"] > 0.97, e
    assert abs(e["knn_candidate"] - e["knn_reference"]) <= 0.1
    assert v["macs_candidate"] < 0.75 * v["macs_reference"]
    low_rank = Recipe(passes=(("low-rank-split", {"method": "dalr", "fraction": 0.5,
                                                  "layers": (FFN.format(2),)}),
                              ("bias-compensate", {})), calib_size=None)
    split = onnxprune.compress(minilm, calib, eval_data=held, recipe=low_rank, measure_latency=False, progress=False)
    assert split.report["validation"]["embedding"]["cosine"] > 0.98


@pytest.mark.slow
def test_the_original_reproduces_the_shared_baselines(minilm, sst2):
    """SST-2 test in file order, first half the index / training half: kNN 73.9 %, probe 77.4 %."""
    pytest.importorskip("sklearn")
    session = make_session(minilm)
    samples = open_samples(sst2, minilm)
    sentence = np.concatenate([out[0] for _, out in run_batches(session, samples, ["461"], batch_size=64)])
    assert round(100 * embedding.knn_accuracy(sentence, sst2["y"]), 1) == 73.9
    assert round(100 * embedding.probe_accuracy(sentence, sst2["y"]), 1) == 77.4



@pytest.mark.slow
def test_head_pruning_reconstructs_and_still_fuses(minilm, sst2, tmp_path):
    """8 of 12 heads per layer: least squares on the output projection beats dropping its rows,
    and onnxruntime's transformer optimizer still fuses the three attention blocks."""
    calib, held = _rows(sst2, slice(0, 150)), _rows(sst2, slice(910, 1010))
    cosine = {}
    for reconstruct in (True, False):
        recipe = Recipe(passes=(("select-nodes", {"counts": {HEADS.format(i): 256 for i in range(3)}}),
                                ("reconstruct-next-layer", {"reconstruct": reconstruct})), calib_size=None)
        result = onnxprune.compress(minilm, calib, eval_data=held, recipe=recipe, measure_latency=False,
                                    progress=False)
        cosine[reconstruct] = result.report["validation"]["embedding"]["cosine"]
        if reconstruct:
            pruned = result.model
    assert cosine[True] > 0.93 and cosine[True] > cosine[False] + 0.02, cosine
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    from onnxprune.model import save_model

    path = tmp_path / "heads.onnx"
    save_model(pruned, path)
    optimised = optimizer.optimize_model(str(path), model_type="bert", num_heads=12, hidden_size=384)
    fused = optimised.get_fused_operator_statistics()
    assert fused["Attention"] == 3 and fused["SkipLayerNormalization"] == 6 and fused["BiasGelu"] == 3
    fast_path = tmp_path / "heads_opt.onnx"
    optimised.save_model_to_file(str(fast_path))
    feed = {k: sst2[k][:8] for k in ("input_ids", "attention_mask")}
    a = make_session(pruned).run(["461"], feed)[0]
    b = make_session(load_model(fast_path)).run(["461"], feed)[0]
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_compress_without_a_budget_plans_within_max_drop_on_the_embedding(minilm, sst2, shared, tmp_path):
    """`compress` with no budget (--max-drop 1) and no labels: damage and check are 100 (1 - cosine);
    the mix leaves the attention projections to head pruning and keeps onnxruntime's fusions."""
    from click.testing import CliRunner

    from onnxprune.cli import main

    calib, held = tmp_path / "calib.npz", tmp_path / "held.npz"
    np.savez(calib, **{k: sst2[k][:64] for k in ("input_ids", "attention_mask")})      # no labels
    np.savez(held, **{k: sst2[k][910:1070] for k in ("input_ids", "attention_mask")})
    out = tmp_path / "minilm.onnx"
    run = CliRunner().invoke(main, ["compress", str(shared / "models" / "minilm_l3_paraphrase.onnx"),
                                    "--target-data", str(calib), "--eval-data", str(held), "-o", str(out),
                                    "--no-latency", "--quiet"])
    assert run.exit_code == 0, run.output
    import json

    report = json.loads((tmp_path / "minilm.report.json").read_text())
    plan = report["plan"]
    assert plan["goal"] == {"max_drop": 1.0} and plan["output_kind"] == "embedding"
    assert plan["check"]["accuracy_reference"] is None          # no labels: the cosine check
    assert plan["check"]["drop"] <= 1.0
    assert plan["sites"] and all("attention" not in s["site"] for s in plan["sites"] if s["family"] == "low-rank")
    v = report["validation"]
    assert v["macs_candidate"] < 0.97 * v["macs_reference"]
    assert v["embedding"]["cosine"] > 0.98, v["embedding"]
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    fused = optimizer.optimize_model(str(out), model_type="bert", num_heads=12,
                                     hidden_size=384).get_fused_operator_statistics()
    assert fused["Attention"] == 3 and fused["SkipLayerNormalization"] == 6, fused


def test_minilm_checks_its_token_inputs_and_outputs_before_any_run(minilm, sst2, shared, tmp_path):
    """What a first MiniLM run meets: --mask-input input_ids (taken silently before), ids outside the
    30522-row vocabulary (negative ones ran, read from the end of the table), --judge-output on
    `output`, the int64 echo of input_ids (cosine 1.0 whatever the compression)."""
    from click.testing import CliRunner

    from onnxprune.cli import main
    from onnxprune.data.tokens import index_limits, position_limit

    assert index_limits(minilm) == {"input_ids": 30522} and position_limit(minilm) == 512
    path = shared / "models" / "minilm_l3_paraphrase.onnx"
    data, bad, out = tmp_path / "sst.npz", tmp_path / "neg.npz", tmp_path / "small.onnx"
    rows = _rows(sst2, slice(0, 16))
    np.savez(data, **rows)
    np.savez(bad, **{**rows, "input_ids": np.where(rows["attention_mask"] == 1, rows["input_ids"], -1)})
    cases = ((["--target-data", str(data), "--mask-input", "input_ids"],
              "input_ids | holds token ids, not a token mask"),
             (["--target-data", str(bad)], "input_ids holds ids -1.."),
             (["--target-data", str(data), "--judge-output", "output"], "'output' is an output of dtype int64"))
    for flags, message in cases:
        result = CliRunner().invoke(main, ["compress", str(path), *flags, "--method", "spectral", "--fraction", "0.5",
                                           "--no-latency", "-o", str(out)])
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not out.exists()
