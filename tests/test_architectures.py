"""The architecture table against the measurement it was derived from: for every family,
the writers, exactly-converted norms and stream starts that patch_model measures on a tiny
model are exactly what the table says."""

import pytest

from hf_rmsnorm import patch_model
from hf_rmsnorm.patching.architectures import ARCHITECTURES, matches, relative_name
from hf_rmsnorm.patching.convert import output_params
from test_convert import PRE_LN, build
from tiny_models import MODELS


@pytest.mark.parametrize("name", list(PRE_LN))
def test_table_equals_measurement(name, monkeypatch):
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    model, _ = build(name)
    arch = ARCHITECTURES[MODELS[name][0]]
    prefix = model.base_model_prefix
    report = patch_model(model)
    # by their parameters: Linear, Conv1D, experts (that the modules it names are such is checked here)
    linear_like = [n for n, m in model.named_modules() if output_params(m)]
    assert sorted(n for n in linear_like if matches(n, arch.writers, prefix)) == sorted(report.conversion["writers"])
    norms = [e["name"] for e in report]
    assert sorted(n for n in norms if matches(n, arch.norms, prefix)) == sorted(e["name"] for e in report if e["change"] == "exact")
    assert sorted(relative_name(s, prefix) for s in report.conversion["runtime_centring"]) == sorted(
        s for s in arch.starts if any(relative_name(n, prefix).startswith(s.rsplit(".", 1)[0] + ".") for n in norms)
    )


def test_opt_post_ln_layout_is_refused_by_the_table():
    from transformers import OPTConfig

    assert ARCHITECTURES["opt"].refusal(OPTConfig(do_layer_norm_before=False)).startswith("post-LN")
    assert ARCHITECTURES["opt"].refusal(OPTConfig()) is None


@pytest.mark.parametrize("model_type", ["wav2vec2", "hubert"])
def test_wav2vec2_base_layout_is_refused_by_the_table(model_type):
    from transformers import AutoConfig

    assert ARCHITECTURES[model_type].refusal(AutoConfig.for_model(model_type, do_stable_layer_norm=False)).startswith("post-LN")
    assert ARCHITECTURES[model_type].refusal(AutoConfig.for_model(model_type, do_stable_layer_norm=True)) is None
