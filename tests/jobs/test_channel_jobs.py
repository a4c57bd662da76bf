"""A recipe with structures: channels: prune_channels on the recipe's data, the channel checkpoint
written, load_output and load_channels give back the pruned model's outputs exactly."""
import json
import os

import pytest
import torch

import prunekit
from prunekit.jobs import load_output, run_recipe
from prunekit.jobs.recipe import load_recipe

from helpers.cnn_toys import tiny_cnn, write_channel_job

X = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(5))


def test_a_channel_recipe_is_the_direct_call_and_reloads(tmp_path):
    outcome = run_recipe(write_channel_job(tmp_path, refine="none"), progress=False)
    out = tmp_path / "out"
    assert set(outcome.files) == {"model.safetensors", "prunekit_channels.json", "prune_report.json",
                                  "prune_report.md", "recipe.yaml"}
    assert isinstance(outcome.result, prunekit.structures.ChannelResult)
    direct = tiny_cnn().eval()
    x = torch.load(tmp_path / "x.pt")
    prunekit.prune_channels(direct, list(x.split(16)), flops=0.5, score="l2", refine=None, damp=0.1)
    with torch.no_grad():
        expected = direct.eval()(X)
        assert torch.equal(outcome.model.eval()(X), expected)
        assert torch.equal(load_output(out)(X), expected)
        assert torch.equal(prunekit.load_channels(out, tiny_cnn)(X), expected)
    report = json.loads((out / "prune_report.json").read_text())
    assert report["result"]["flops_removed"] == outcome.result.flops_removed >= 0.5
    assert report["result"]["macs_after"] < report["result"]["macs_before"]
    assert json.loads((out / "prunekit_channels.json").read_text())["input_shape"] == [1, 28, 28]
    assert load_recipe(out / "recipe.yaml").structured == load_recipe(write_channel_job(tmp_path, refine="none")).structured


def test_a_compressed_only_channel_output_reloads_too(tmp_path):
    path = write_channel_job(tmp_path, refine="none")
    outcome = run_recipe(load_recipe(path, formats=["compressed"]), progress=False)
    assert {"model.prunekit.safetensors", "prunekit_channels.json"} <= set(outcome.files)
    assert "model.safetensors" not in outcome.files
    with torch.no_grad():
        assert torch.equal(load_output(tmp_path / "out")(X), outcome.model.eval()(X))


def test_mlp_on_a_cnn_is_refused_before_anything_is_written(tmp_path):
    path = write_channel_job(tmp_path)
    recipe = load_recipe(path, structures="mlp", ratio=0.5, method="wanda")
    assert recipe.structured.flops is None  # the amount given replaces the recipe's
    with pytest.raises(ValueError, match="has convolutions and no mlp structure .* use structures=channels"):
        run_recipe(recipe, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["job.yaml", "x.pt"]


def test_an_interrupted_channel_job_leaves_no_output(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("prunekit.structures.channels.prune_channels", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(write_channel_job(tmp_path), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["job.yaml", "x.pt"]


def test_a_recipe_ranked_by_measured_sensitivity_runs_and_reloads(tmp_path):
    outcome = run_recipe(write_channel_job(tmp_path, refine="lstsq", budget="global", rank_by="sensitivity"),
                         progress=False)
    assert outcome.result.flops_removed >= 0.5 and outcome.result.predicted_speedup is None
    with torch.no_grad():
        assert torch.equal(load_output(tmp_path / "out")(X), outcome.model.eval()(X))
