"""`igpt plan`: the paper's protocol at scale planned from igpt's own estimates, without running anything."""

import json

import pytest

from igpt.pipeline.scale import plan
from igpt.probes.memory import out_of_core_bytes, probe_bytes, store_bytes


def test_the_plan_is_igpts_own_estimates_and_shares_the_pass_over_gpus():
    one, eight = plan(), plan(gpus=8)
    n_train = 1_281_167 - 10_000
    sizes = (n_train, 60_000, 25, 512, "mean", None)  # iGPT-S: 24 blocks + the embeddings, 512 wide
    assert one["estimate"] and one["model"]["layers"] == 24
    assert one["probe"]["memory_in_memory"] == probe_bytes(*sizes)
    assert one["probe"]["memory_from_disk"] == out_of_core_bytes(*sizes)
    assert one["probe"]["disk_store"] == store_bytes(*sizes)
    assert not one["probe"]["fits_in_memory"]  # 66 GiB of mean features on a 64 GiB node: from disk
    assert plan(memory_gib=512)["probe"]["fits_in_memory"]
    assert eight["probe"]["feature_pass_hours"] == pytest.approx(one["probe"]["feature_pass_hours"] / 8)
    assert one["prepare"]["disk_tokens"] == (1_281_167 + 50_000) * 1024 * 2  # uint16 tokens for K=512
    bigger = plan(preset="igpt-l")  # more products per token: a slower pass at the same FLOP rate
    assert bigger["probe"]["feature_pass_hours"] > 5 * one["probe"]["feature_pass_hours"]


def test_the_plan_command_prints_lines_or_json_and_refuses_bad_sizes(capsys, cli_error):
    from igpt.cli import main

    main(["plan", "--gpus", "8"])
    out = capsys.readouterr().out
    assert out.startswith("plan (estimates)") and "8 GPU(s)" in out and "probe:" in out
    main(["plan", "--json", "--tokens-per-second", "1e6"])
    res = json.loads(capsys.readouterr().out)
    assert res["settings"]["tokens_per_second"] == 1e6
    assert "--gpus must be a positive integer" in cli_error("plan", "--gpus", "0")
    assert "unknown --preset" in cli_error("plan", "--preset", "huge")
