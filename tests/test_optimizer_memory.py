"""bench/optimizer_memory.py end to end at a small width: each option in its own process, and the
fused back pass measurably holds no full set of gradients."""

from bench import optimizer_memory


def test_optimizer_memory_per_parameter(capsys):
    results = optimizer_memory.main(["--device", "cpu", "--channels", "32", "--latent", "8"])
    printed = capsys.readouterr().out
    assert "Command: `python -m bench.optimizer_memory " in printed and "bytes / parameter" in printed
    base = results["activations"]["extra_bytes"]

    def per_parameter(name):
        return (results[name]["extra_bytes"] - base) / results[name]["parameters"]

    # AdamW: a gradient and two fp32 moments, 12 bytes, plus allocator slack.
    assert 11 < per_parameter("adamw") < 15
    # The fused back pass frees each gradient inside backward: about 4 bytes less.
    assert per_parameter("adamw + fused_backward") < per_parameter("adamw") - 2.5
    # Issue 31, by the arithmetic in training/optimizers.py: Lion keeps one moment (8 bytes with the
    # gradient), Prodigy four tensors (20), Adafactor factored statistics (about 4). Measured at
    # 32 channels: 8.41, 20.49, 6.48 (Adafactor's step holds per-tensor temporaries).
    assert per_parameter("lion") < per_parameter("adamw") - 2.5
    assert per_parameter("prodigy") > per_parameter("adamw") + 5
    assert per_parameter("adafactor") < per_parameter("lion")
    assert per_parameter("lion + fused_backward") < per_parameter("lion") - 2.5
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 10  # header, ten options (rows say what to install when a package is missing)
