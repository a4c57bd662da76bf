"""prunekit prune --structures channels and prunekit report on a vision model: the recipe Python
builds, a reloadable output, multiply-adds equal to prune_channels' count, several batch sizes."""
import json
import os
import sys

import torch

import prunekit
from prunekit.cli import build_parser, main
from prunekit.cli.prune_cmd import build_recipe

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
sys.path.insert(0, HERE)

from helpers.cnn_toys import tiny_cnn, write_channel_job  # noqa: E402


def one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunekit: error:") and "\n" not in err and "Traceback" not in err, err
    assert match in err, err


def test_structures_channels_from_the_command_line(tmp_path, capsys, monkeypatch):
    write_channel_job(tmp_path)  # its x.pt
    monkeypatch.chdir(tmp_path)
    argv = ["prune", "helpers.cnn_toys:tiny_cnn", "--structures", "channels", "--flops", "0.5", "--method", "bn",
            "--refine", "none", "--no-recalibrate-bn", "--exclude", "fc", "--data-tensors", "x.pt", "--batch-size", "16",
            "--format", "hf", "-o", "out"]
    cli = build_recipe(build_parser().parse_args(argv))
    assert cli == prunekit.load_recipe({}, source="helpers.cnn_toys:tiny_cnn", structures="channels", flops=0.5,
                                       method="bn", refine="none", recalibrate_bn=False, exclude=["fc"],
                                       tensors="x.pt", batch_size=16, formats=["hf"], dir="out")
    assert cli.structured.exclude == ("fc",) and cli.prune.exclude is None
    from_file = build_recipe(build_parser().parse_args(["prune", "job.yaml", "--exclude", "fc", "--no-recalibrate-bn"]))
    assert (from_file.structured.exclude, from_file.structured.recalibrate_bn) == (("fc",), False)  # the file's section
    assert main(argv) == 0
    assert "multiply-adds" in capsys.readouterr().out  # ChannelResult.summary()
    direct = tiny_cnn().eval()
    prunekit.prune_channels(direct, list(torch.load("x.pt").split(16)), flops=0.5, score="bn", refine=None,
                            recalibrate_bn=False, exclude="(?:fc)", damp=0.1)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(prunekit.load_channels("out", tiny_cnn)(x), direct(x))


def test_report_on_a_channel_output_times_batch_1_and_64_against_the_dense_model(tmp_path, capsys):
    from prunekit.jobs import run_recipe

    outcome = run_recipe(write_channel_job(tmp_path, refine="none"), progress=False)
    argv = ["report", str(tmp_path / "out"), "--baseline", "helpers.cnn_toys:tiny_cnn", "--batch-size", "1,64",
            "--repeats", "2", "--warmup", "1", "--threads", "1"]
    assert main([*argv, "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["batch_size"] for s in out["speeds"]] == [1, 64] and out["speed"]["batch_size"] == 1
    one, many = out["speeds"]
    # the random images have the shape the output recorded; FLOPs are 2 per multiply-add of convs and Linears
    assert one["model"]["flops"] == 2 * outcome.result.macs_after and one["baseline"]["flops"] == 2 * outcome.result.macs_before
    assert many["model"]["flops"] == 64 * one["model"]["flops"]
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (one["model"]["params"], one["baseline"]["params"]) == (params(outcome.model), params(tiny_cnn()))
    assert one["ratios"]["speedup"] > 0 and len(many["model"]["times_ms"]) == 2
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "batch size 1:" in text and "batch size 64:" in text and "2 per multiply-add" in text


def test_input_shape_and_too_few_rows(tmp_path, capsys):
    assert main(["report", "helpers.cnn_toys:tiny_cnn", "--speed", "--input-shape", "1,28,28", "--batch-size", "3",
                 "--repeats", "1", "--format", "json"]) == 0
    speed = json.loads(capsys.readouterr().out)["speed"]
    assert speed["batch_size"] == 3 and speed["model"]["flops"] > 0
    assert main(["report", "--batch-size", "2", "helpers.cnn_toys:tiny_cnn", "--speed", "--input-shape", "1,28,28",
                 "--repeats", "1", "--format", "json"]) == 0  # a single size before the positional still parses
    assert json.loads(capsys.readouterr().out)["speed"]["batch_size"] == 2
    assert main(["report", "helpers.cnn_toys:tiny_cnn", "--batch-size", "1,x"]) == 2
    assert "invalid batch_sizes value" in capsys.readouterr().err
    one_line_error(capsys, ["report", "helpers.cnn_toys:tiny_cnn", "--speed", "--input-shape", "1x28"],
                   "--input-shape takes positive integers separated by commas")
    torch.save(torch.randn(4, 1, 28, 28), tmp_path / "x.pt")
    one_line_error(capsys, ["report", "helpers.cnn_toys:tiny_cnn", "--speed", "--data-tensors", str(tmp_path / "x.pt"),
                            "--batch-size", "1,64"], "holds 4 rows, fewer than --batch-size 64")


def test_bad_combinations_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    write_channel_job(tmp_path)
    monkeypatch.chdir(tmp_path)
    base = ["prune", "helpers.cnn_toys:tiny_cnn", "--data-tensors", "x.pt", "-o", "out"]
    one_line_error(capsys, [*base, "--structures", "mlp", "--ratio", "0.5"], "has convolutions and no mlp structure")
    one_line_error(capsys, [*base, "--structures", "channels", "--ratio", "0.5", "--method", "flap"],
                   "structured.method must be one of l2, bn, wanda, obs for structures=channels")
    one_line_error(capsys, [*base, "--structures", "channels,mlp", "--ratio", "0.5"], "does not combine with mlp")
    one_line_error(capsys, [*base, "--structures", "channels", "--ratio", "0.5", "--target", "dense"],
                   "structured.target applies to structures mlp")
    one_line_error(capsys, ["prune", "helpers.cnn_toys:tiny_cnn", "--structures", "channels", "--ratio", "0.5"],
                   "structures channels needs calibration data (the model is traced on a batch)")
    assert not os.path.exists("out")
    assert main(["prune", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "'channels' (a CNN's coupled channels, by prunekit.prune_channels)" in text
    assert "channels only: re-estimate BatchNorm statistics" in text and "channels only: regexes of module names" in text
