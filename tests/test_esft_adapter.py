import json

import pytest
import torch

from deepseekmoe.finetune.esft.adapter import apply_esft_adapter, save_esft_adapter, validate_expert_config
from modeling_deepseekmoe import DeepseekMoEForCausalLM

from conftest import tiny_config

SELECTION = {"experts": {"1": [0, 5], "2": [3]}, "shared_experts": False, "non_expert_modules": False}


def perturbed_pair():
    torch.manual_seed(0)
    base = DeepseekMoEForCausalLM(tiny_config()).eval()
    tuned = DeepseekMoEForCausalLM(tiny_config()).eval()
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        tuned.model.layers[1].mlp.experts.gate_up_proj[5] += 0.5
        tuned.model.layers[2].mlp.experts.down_proj[3] -= 0.5
    return base, tuned


def test_adapter_round_trip_reproduces_the_tuned_model(tmp_path):
    base, tuned = perturbed_pair()
    adapter = save_esft_adapter(tuned, SELECTION, tmp_path / "adapter", base_model_name_or_path="tiny")
    saved = json.loads((adapter / "expert_config.json").read_text())
    assert saved == {"experts": {"1": [0, 5], "2": [3]}, "shared_experts": False, "non_expert_modules": False}
    ids = torch.randint(2, 96, (2, 9))
    assert not torch.allclose(base(ids).logits, tuned(ids).logits)
    apply_esft_adapter(base, adapter)
    torch.testing.assert_close(base(ids).logits, tuned(ids).logits, atol=0, rtol=0)
    metadata = json.loads((adapter / "esft_adapter.json").read_text())
    assert metadata["num_parameters"] == 3 * 3 * 32 * 16  # three experts, three [16, 32] projections


def test_adapter_for_another_base_is_refused(tmp_path):
    _, tuned = perturbed_pair()
    adapter = save_esft_adapter(tuned, SELECTION, tmp_path / "adapter")
    other = DeepseekMoEForCausalLM(tiny_config(n_routed_experts=16))
    with pytest.raises(ValueError, match="does not match this base model .*n_routed_experts: adapter 8 vs model 16"):
        apply_esft_adapter(other, adapter)


@pytest.mark.parametrize(
    ("experts", "message"),
    [
        ({"0": [1]}, "layer 0, which is a dense layer"),
        ({"7": [1]}, "names layer 7, but the model has layers 0..2"),
        ({"1": [8]}, r"expert\(s\) \[8\] in layer 1"),
        ({"1": []}, "selects nothing to train"),
    ],
)
def test_bad_expert_configs_are_refused(experts, message):
    with pytest.raises(ValueError, match=message):
        validate_expert_config({"experts": experts}, tiny_config())


def test_missing_adapter_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="expert_config.json is missing"):
        apply_esft_adapter(DeepseekMoEForCausalLM(tiny_config()), tmp_path)
