"""`quantgate sweep`: perplexity and ratio under a grid of protocols, on the tiny project."""

import json
import math
import re

import matplotlib  # noqa: F401  imported out here, as the other plotting tests do

from quantgate import cli
from quantgate.sweep import GridPoint, grid


def test_the_grid_has_every_preset_at_every_length_and_strides_for_hf_sliding_only():
    points = grid(["hf-sliding", "lm-eval"], [32, 64], [0.5, 1.0])
    assert points == [GridPoint("hf-sliding", 32, 16), GridPoint("hf-sliding", 32, 32), GridPoint("hf-sliding", 64, 32),
                      GridPoint("hf-sliding", 64, 64), GridPoint("lm-eval", 32, 32), GridPoint("lm-eval", 64, 64)]


def test_sweep_writes_the_table_and_plot_and_agrees_with_the_baseline(tiny_project, tmp_path, capsys):
    """At the manifest's own protocol the sweep's FP16 perplexity is the stored baseline's; each variant's ratio is
    its perplexity over FP16's at the same grid point; the spread table covers each checkpoint."""
    manifest = tiny_project / "quantgate.toml"
    assert cli.main(["baseline", "--manifest", str(manifest), "--corpus", "code", "--no-snapshots"]) == 0
    stored = json.loads((tiny_project / "baselines" / "tiny" / "code.full.json").read_text())
    capsys.readouterr()
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "--manifest", str(manifest), "--corpus", "code", "--variant", "close",
                     "--preset", "hf-sliding", "--preset", "lm-eval", "--max-length", "64", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert (out / "sweep-tiny-code.md").read_text() == text
    assert (out / "sweep-tiny-code.png").stat().st_size > 0 and (out / "sweep-tiny-code.svg").exists()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines()
            if line.startswith("| hf-sliding") or line.startswith("| lm-eval")}
    assert set(rows) == {"hf-sliding 64/32", "hf-sliding 64/64", "lm-eval 64"}
    own = rows["hf-sliding 64/32"]  # the manifest's max_length 64, stride 32
    assert float(own[1]) == float(f"{stored['summary']['perplexity']:.4g}")
    reference, variant, ratio = float(own[1]), float(own[2]), float(own[3].strip(" |"))
    assert math.isclose(ratio, variant / reference, rel_tol=2e-3)  # the table rounds perplexities to 4 digits
    assert re.search(r"^\| close \| .* to .* \| .*% \| .* to .* \| .*% \|$", text, re.M)


def test_sweep_names_an_unknown_variant(tiny_project, capsys):
    assert cli.main(["sweep", "--manifest", str(tiny_project / "quantgate.toml"), "--variant", "nope"]) == 2
    assert "has no variant 'nope'" in capsys.readouterr().err
