"""hf-rmsnorm inspect: the report patch_model would produce, from a directory, a config or a
model_type, changing nothing; bad input gets one line on stderr and exit status 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_rmsnorm.cli import main
from tiny_models import build


def test_inspect_a_saved_model_directory(tmp_path, capsys):
    model, _ = build("gemma")
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hf_rmsnorm: GemmaForCausalLM, target=rmsnorm: 5 fused")
    assert "would change 5 of 5" in out and "offset=1" in out


def test_inspect_a_config_file_and_a_model_type_as_json(tmp_path, capsys):
    model, _ = build("t5")
    model.config.to_json_file(tmp_path / "config.json")
    assert main(["inspect", str(tmp_path / "config.json"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # a config saved without "architectures" is built with AutoModel
    assert report["model"] == "T5Model" and len(report["entries"]) == 12
    assert {e["change"] for e in report["entries"]} == {"fused"}
    # a default (full-size) config: built on the meta device, only the norms materialised
    assert main(["inspect", "olmo", "--target", "layernorm", "--include", "layers.0.*"]) == 0
    out = capsys.readouterr().out
    assert "OlmoLayerNorm → FusedLayerNorm" in out and "2 fused" in out
    # the exact conversion is measured on real weights: a 7B default config is refused
    assert main(["inspect", "olmo"]) == 2
    assert "needs real weights: pass a model directory, or --target layernorm" in capsys.readouterr().err


def test_inspect_shows_the_exact_conversion_of_a_saved_pre_ln_model(tmp_path, capsys):
    model, _ = build("gpt_neox")
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "target=rmsnorm: 0 fused, 5 exact" in out and "LayerNorm → FusedRMSNorm" in out
    assert "stream start centred at run time at: gpt_neox.layers.0" in out


@pytest.mark.parametrize(
    "arg,message",
    [
        ("/no/such/dir", "no such directory"),
        ("not_a_model_type", "neither a local model directory, a config.json, nor a known model_type"),
        ("missing.json", "no such file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(arg, message, capsys):
    assert main(["inspect", arg]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-rmsnorm inspect: ") and message in err and err.count("\n") == 1


def test_directory_without_config(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "without config.json" in capsys.readouterr().err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "hf-rmsnorm"  # installed by pip as a console script
    assert script.exists(), "the hf-rmsnorm console script is not installed"
    proc = subprocess.run([str(script), "inspect", "gpt2", "--target", "layernorm", "--include", "h.0.*"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "h.0.ln_1" in proc.stdout and "LayerNorm → FusedLayerNorm" in proc.stdout
