"""Multi-process SFT: a 2-process CPU run launched by `accelerate launch` (DDP over gloo), and the shipped accelerate
configs (DeepSpeed ZeRO-2/3, FSDP2) validated through accelerate's own launch-argument parsing.

accelerate runs CPU processes as MULTI_CPU (DDP over gloo) and ignores an FSDP config when training on the CPU, so
the 2-process run is DDP; FSDP2 and DeepSpeed need GPUs and are checked here as configurations.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from modeling_deepseekmoe import DeepseekMoEForCausalLM
from modeling_deepseekmoe.checkpoint import validate_checkpoint

from test_sft import write_base, write_jsonl


CONFIGS = Path(__file__).resolve().parents[1] / "finetune" / "configs"
# Each rank's micro-batch is one 3-token row (BOS, word, EOS) and the router picks 1 of 8 experts per token, so in
# every MoE layer at least 5 experts get no token on each rank, every step (by construction, whatever the weights).
SHORT_ROWS = [{"text": word} for word in ["sun", "red", "cat", "dog", "sky", "map", "pen", "cup"]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_run_with_idle_experts_on_a_rank_completes_and_saves_a_loadable_checkpoint(tmp_path):
    base = write_base(tmp_path / "base", num_experts_per_tok=1)
    data = write_jsonl(tmp_path / "short.jsonl", SHORT_ROWS)
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp_cpu.yaml"),
        "--num_processes", "2", "--main_process_port", str(free_port()),
        "-m", "deepseekmoe.finetune.sft",
        "--model_name_or_path", str(base), "--dataset_name", str(data), "--output_dir", str(output),
        "--use_cpu", "true", "--bf16", "false", "--dtype", "float32", "--gradient_checkpointing", "false",
        "--per_device_train_batch_size", "1", "--max_steps", "3", "--learning_rate", "1e-2", "--logging_steps", "1",
        "--save_steps", "3", "--max_length", "16", "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]

    summary = json.loads((output / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 3

    # Every step, each rank routed no token to some experts, and the step completed (the fused expert tensors are
    # used, and all-reduced, on every rank whatever the routing).
    idle = {rank: json.loads((output / "expert_load" / f"idle_rank{rank}.json").read_text()) for rank in (0, 1)}
    for rank in (0, 1):
        assert [record["step"] for record in idle[rank]["records"]] == [1, 2, 3]
        for record in idle[rank]["records"]:
            assert all(len(experts) >= 5 for experts in record["idle_experts"].values())
    # ... including experts that the other rank did use in the same step (the case that hangs ZeRO-3 when experts
    # are separate modules): global load (all ranks, logged every step) > 0 while one rank had none.
    records = (output / "expert_load" / "load.jsonl").read_text().splitlines()
    global_load = {record["step"]: record for record in map(json.loads, records)}
    asymmetric = [
        (rank, record["step"], layer, expert)
        for rank in (0, 1)
        for record in idle[rank]["records"]
        for layer, experts in record["idle_experts"].items()
        for expert in experts
        if global_load[record["step"]]["load"][global_load[record["step"]]["layers"].index(int(layer))][expert] > 0
    ]
    assert asymmetric

    # The checkpoint and the final model load, in the released layout.
    model = DeepseekMoEForCausalLM.from_pretrained(output)
    validate_checkpoint(output, model.config)
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    from_checkpoint = DeepseekMoEForCausalLM.from_pretrained(output / "checkpoint-3")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(from_checkpoint.state_dict()[name], tensor)
    assert not torch.equal(model.model.layers[1].mlp.experts.down_proj,
                           DeepseekMoEForCausalLM.from_pretrained(base).model.layers[1].mlp.experts.down_proj)


def launch_environment(config_name: str) -> tuple[object, dict[str, str]]:
    """What `accelerate launch --config_file <config>` would do: its parsed arguments and the environment it sets."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{config_name}.yaml"), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, {key: value for key, value in env.items() if key.startswith(("ACCELERATE_", "FSDP_"))}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return DeepseekMoEForCausalLM.from_pretrained(write_base(tmp_path_factory.mktemp("base")))


@pytest.mark.parametrize("config_name,stage", [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_deepspeed_configs_parse(config_name, stage, tiny_model):
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.dataclasses import get_module_class_from_name

    args, env = launch_environment(config_name)
    assert args.use_deepspeed
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == stage
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"  # left to the SFT flags
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"]
        leaf = env["ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES"]
        assert get_module_class_from_name(tiny_model, leaf).__name__ == "DeepseekMoESparseMoeBlock"


def test_deepspeed_zero3_leaf_modules(tiny_model):
    deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra and is not installed")
    from modeling_deepseekmoe.modeling_deepseekmoe import DeepseekMoESparseMoeBlock

    deepspeed.utils.set_z3_leaf_modules(tiny_model, [DeepseekMoESparseMoeBlock])
    assert len(deepspeed.utils.get_z3_leaf_modules(tiny_model)) == 2


def test_fsdp2_config_wraps_whole_decoder_layers(tiny_model):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.dataclasses import get_module_class_from_name

    args, env = launch_environment("fsdp2")
    assert args.use_fsdp
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert set(plugin.transformer_cls_names_to_wrap) == {"DeepseekMoEDecoderLayer"}
    layer_class = get_module_class_from_name(tiny_model, "DeepseekMoEDecoderLayer")
    assert layer_class is type(tiny_model.model.layers[0])
    assert set(tiny_model._no_split_modules) == {"DeepseekMoEDecoderLayer"}  # device_map splits there too


def test_ddp_config_launches_two_processes():
    args, _ = launch_environment("ddp_cpu")
    assert args.multi_gpu and args.num_processes == 2  # torchrun launcher; the processes run on CPU with gloo
