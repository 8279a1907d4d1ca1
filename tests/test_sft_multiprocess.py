"""Multi-process training with every shipped accelerate config: 2 CPU processes (gloo) per engine, DDP, DeepSpeed
ZeRO-2, ZeRO-3 and FSDP2, each running full SFT, LoRA on the routed experts and ESFT, checked against a
single-process run of the same global batches.

The tiny model routes each token to 1 of 8 experts and each rank's micro-batch is one short row, so in every MoE
layer several experts get no token on a rank while the other rank uses them. The ESFT selection is chosen so that on
rank 0 no selected expert gets a token in the first step (everything upstream is frozen): the case that hung FSDP2,
broke ZeRO-2's gradient buckets and left nothing to differentiate in a single process.

One launch per engine runs the three modes in turn (`python tests/test_sft_multiprocess.py SPEC` is the worker
`accelerate launch` starts); two adjustments are the harness's, not what users run:
- accelerate 1.15 ignores an FSDP config for CPU processes (it runs DDP instead), so the worker makes it take FSDP2;
- DeepSpeed's CPU-only shared-memory allreduce kernel (JIT-compiled on first use, 1-2 min) is not built: the
  collectives go through torch.distributed (gloo here, NCCL on GPUs).
"""

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from modeling_deepseekmoe import DeepseekMoEForCausalLM
from modeling_deepseekmoe.checkpoint import validate_checkpoint

from test_sft import write_base, write_jsonl


CONFIGS = Path(__file__).resolve().parents[1] / "finetune" / "configs"
# Rows of 3-5 tokens (BOS, a word, EOS) and top-1 routing over 8 experts: several experts idle per rank and step.
SHORT_ROWS = [{"text": word} for word in ["sun", "red", "cat", "dog", "sky", "map", "pen", "cup"]]
WORLD_SIZE = 2
ENGINES = {"ddp": "ddp_cpu", "zero2": "deepspeed_zero2", "zero3": "deepspeed_zero3", "fsdp2": "fsdp2"}
MODES = ("full", "lora", "esft")
# A file only that engine writes into a checkpoint: the engine really ran (accelerate falls back to DDP silently).
ENGINE_CHECKPOINT_FILES = {
    "ddp": "optimizer.pt", "zero2": "global_step2/mp_rank_00_model_states.pt",
    "zero3": "global_step2/zero_pp_rank_1_mp_rank_00_model_states.pt", "fsdp2": "optimizer.bin",
}  # fmt: skip
LAUNCH_TIMEOUT = 420  # seconds; a hang (e.g. a collective one rank never joins) fails the test instead of CI
STEPS = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------- runs


def mode_argv(mode: str, workspace: dict, output: Path, batch_size: int, *extra: str) -> list[str]:
    """The command-line flags of one run: the same for the single-process reference (batch 2) and each rank of a
    2-process run (batch 1), sequential sampling so both see the same global batches. SGD with momentum: its steps
    are linear in the gradients, so weights compare tightly (Adam turns float noise in near-zero gradients into
    full steps), and its momentum is optimizer state for resuming."""
    argv = [
        "--model_name_or_path", workspace["base"], "--dataset_name", workspace["data"], "--output_dir", str(output),
        "--use_cpu", "true", "--bf16", "false", "--dtype", "float32", "--aux_loss_alpha", "0",
        "--per_device_train_batch_size", str(batch_size), "--train_sampling_strategy", "sequential",
        "--max_steps", str(STEPS), "--optim", "sgd", "--optim_args", "momentum=0.9", "--learning_rate", "0.3",
        "--lr_scheduler_type", "constant",
        "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2", "--max_length", "16",
        "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--dataloader_num_workers", "0",
    ]  # fmt: skip
    if mode == "lora":
        argv += ["--use_peft", "--lora_target_modules", "experts", "--lora_r", "4", "--lora_alpha", "8",
                 "--gradient_checkpointing", "false"]
    elif mode == "esft":
        argv += ["--expert_config", workspace["expert_config"], "--gradient_checkpointing", "true"]
    else:
        argv += ["--gradient_checkpointing", "false"]
    return argv + list(extra)


def run_mode(mode: str, workspace: dict, output: Path, batch_size: int, *extra: str) -> list[float]:
    """Train one mode; returns the loss logged at each step."""
    from deepseekmoe.finetune.esft.train import parse_esft_args, run_esft
    from deepseekmoe.finetune.sft import parse_sft_args, run_sft

    argv = mode_argv(mode, workspace, output, batch_size, *extra)
    result = run_esft(*parse_esft_args(argv)) if mode == "esft" else run_sft(*parse_sft_args(argv))
    return [entry["loss"] for entry in result.trainer.state.log_history if "loss" in entry]


def _force_fsdp_on_cpu() -> None:
    """accelerate 1.15 turns an FSDP launch on CPU processes into MULTI_CPU (DDP); FSDP2 itself runs on CPU/gloo."""
    from accelerate import state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = init


def _skip_deepspeed_cpu_shm_kernel() -> None:
    try:
        # By module name: the attribute `deepspeed.comm.torch` is the torch package (`from .comm import *`).
        backend = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    backend.build_shm_op = lambda: None


def worker(spec: dict) -> None:
    """One rank of a 2-process launch: every mode of `spec` in turn; rank 0 writes the losses."""
    if spec["engine"] == "fsdp2":
        _force_fsdp_on_cpu()
    _skip_deepspeed_cpu_shm_kernel()
    root = Path(spec["root"])
    results = {}
    for mode in spec["modes"]:
        results[mode] = {"losses": run_mode(mode, spec["workspace"], root / mode, 1)}
        if mode == "esft":  # resume the same run from its step-2 checkpoint, into another folder
            results["esft_resumed"] = {"losses": run_mode(
                mode, spec["workspace"], root / "esft_resumed", 1,
                "--resume_from_checkpoint", str(root / mode / "checkpoint-2"),
            )}  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        (root / "results.json").write_text(json.dumps(results))


def launch(config_file: Path, spec: dict, log: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
        "--num_processes", str(WORLD_SIZE), "--main_process_port", str(free_port()), "--mixed_precision", "no",
        __file__, json.dumps(spec),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired as timeout:
        message = f"timed out after {LAUNCH_TIMEOUT} s"
        completed = subprocess.CompletedProcess(command, -1, str(timeout.stdout), message)
    log.write_text(completed.stdout + completed.stderr)
    return completed


def routed_experts(base: Path, data: Path) -> list[dict[int, set[int]]]:
    """Per training row, the experts each MoE layer of the base model routes its tokens to."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from deepseekmoe.finetune.data import prepare_sft_dataset

    rows = prepare_sft_dataset(Dataset.from_json(str(data)), AutoTokenizer.from_pretrained(base), max_length=16)
    model = DeepseekMoEForCausalLM.from_pretrained(base).eval()
    routing: dict[int, set[int]] = {}
    for index, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(
                lambda module, args, output, index=index: routing.__setitem__(index, set(output[3].flatten().tolist()))
            )
    per_row = []
    with torch.no_grad():
        for row in rows:
            model(torch.tensor([row["input_ids"]]))
            per_row.append(dict(routing))
    return per_row


# ---------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    base = write_base(root / "base", num_experts_per_tok=1)
    data = write_jsonl(root / "short.jsonl", SHORT_ROWS)
    # ESFT: in each MoE layer an expert that rank 0's first row (step 1) does not use and a rank-1 row does.
    routing = routed_experts(base, data)
    rank1_rows = routing[1::WORLD_SIZE]
    selection = {}
    for layer in routing[0]:
        used_by_rank1 = set().union(*(row[layer] for row in rank1_rows))
        candidates = sorted(used_by_rank1 - routing[0][layer])
        assert candidates, f"layer {layer}: no expert idle on rank 0 at step 1 but used by rank 1"
        selection[str(layer)] = candidates[:1]
    expert_config = root / "experts.json"
    expert_config.write_text(json.dumps({"experts": selection}))
    return {"root": root, "base": str(base), "data": str(data), "expert_config": str(expert_config),
            "selection": {int(layer): ids for layer, ids in selection.items()}}


@pytest.fixture(scope="module")
def reference(workspace):
    """Single-process runs of the same global batches (batch 2, one process), once per mode."""
    cache = {}

    def get(mode):
        if mode not in cache:
            output = workspace["root"] / "single" / mode
            cache[mode] = {"losses": run_mode(mode, workspace, output, WORLD_SIZE), "output": output}
        return cache[mode]

    return get


@pytest.fixture(scope="module")
def engine_runs(workspace):
    """One 2-process launch per engine (all modes), made when a test first needs it."""
    cache = {}

    def get(engine, config_file=None, modes=MODES):
        key = (engine, str(config_file))
        if key not in cache:
            root = workspace["root"] / f"engine_{engine}_{len(cache)}"
            root.mkdir()
            spec = {"engine": engine, "modes": list(modes), "root": str(root),
                    "workspace": {k: workspace[k] for k in ("base", "data", "expert_config")}}
            completed = launch(config_file or CONFIGS / f"{ENGINES[engine]}.yaml", spec, root / "launch.log")
            results = json.loads((root / "results.json").read_text()) if completed.returncode == 0 else None
            cache[key] = (completed, root, results)
        return cache[key]

    return get


# ---------------------------------------------------------------------------------------------------------- checks


def assert_launch_succeeded(completed, engine):
    assert completed.returncode == 0, f"{engine}: " + completed.stdout[-3000:] + completed.stderr[-6000:]


def check_full(output: Path, reference_output: Path, base: str) -> None:
    model = DeepseekMoEForCausalLM.from_pretrained(output)
    validate_checkpoint(output, model.config)
    expected = DeepseekMoEForCausalLM.from_pretrained(reference_output).state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=1e-4, msg=name)
    checkpoint = DeepseekMoEForCausalLM.from_pretrained(output / f"checkpoint-{STEPS}").state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(checkpoint[name], tensor)
    base_experts = DeepseekMoEForCausalLM.from_pretrained(base).model.layers[1].mlp.experts.down_proj
    assert not torch.equal(model.model.layers[1].mlp.experts.down_proj, base_experts)
    # Every step each rank left experts idle, some of which the other rank used in that step (global load > 0).
    idle = [json.loads((output / "expert_load" / f"idle_rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    assert all([record["step"] for record in rank["records"]] == list(range(1, STEPS + 1)) for rank in idle)
    global_load = {record["step"]: record for record in map(json.loads, (output / "expert_load" / "load.jsonl")
                                                             .read_text().splitlines())}
    assert any(
        global_load[record["step"]]["load"][global_load[record["step"]]["layers"].index(int(layer))][expert] > 0
        for rank in idle for record in rank["records"]
        for layer, experts in record["idle_experts"].items() for expert in experts
    )


def check_lora(output: Path, reference_output: Path, base: str) -> None:
    from deepseekmoe.finetune.lora import load_lora_adapter

    adapted = load_lora_adapter(DeepseekMoEForCausalLM.from_pretrained(base), output)
    assert any("lora_A" in name for name, _ in adapted.named_parameters())
    weights = load_file(output / "adapter_model.safetensors")
    expected = load_file(reference_output / "adapter_model.safetensors")
    assert weights.keys() == expected.keys() and any(".mlp.experts.lora_B" in name for name in weights)
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def check_esft(output: Path, reference_output: Path, base: str, selection: dict[int, list[int]]) -> None:
    from deepseekmoe.finetune.esft.adapter import apply_esft_adapter

    weights = load_file(output / "adapter_model.safetensors")
    expected = load_file(reference_output / "adapter_model.safetensors")
    assert weights.keys() == expected.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=1e-4, msg=name)
    # The adapter loads, and applying it changes exactly the selected experts (each was trained: rank 1 used it).
    before = DeepseekMoEForCausalLM.from_pretrained(base).state_dict()
    after = apply_esft_adapter(DeepseekMoEForCausalLM.from_pretrained(base), output).state_dict()
    for name, tensor in before.items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            changed = (after[name] != tensor).flatten(1).any(dim=1).nonzero().flatten().tolist()
            assert changed == selection[int(name.split(".")[2])], name
        else:
            assert torch.equal(after[name], tensor), name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_processes_match_one_process(engine, mode, workspace, reference, engine_runs):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    completed, root, results = engine_runs(engine)
    assert_launch_succeeded(completed, engine)
    single = reference(mode)
    assert results[mode]["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)
    assert len(single["losses"]) == STEPS
    output = root / mode
    assert (output / "checkpoint-2" / ENGINE_CHECKPOINT_FILES[engine]).is_file()
    if mode == "full":
        check_full(output, single["output"], workspace["base"])
    elif mode == "lora":
        check_lora(output, single["output"], workspace["base"])
    else:
        check_esft(output, single["output"], workspace["base"], workspace["selection"])
        # Resumed from the step-2 checkpoint: the same steps 3-4 and the same adapter as the uninterrupted run.
        resumed = results["esft_resumed"]["losses"]
        assert resumed[-2:] == pytest.approx(results[mode]["losses"][-2:], rel=1e-5, abs=1e-6)
        torch.testing.assert_close(load_file(root / "esft_resumed" / "adapter_model.safetensors"),
                                   load_file(output / "adapter_model.safetensors"), atol=1e-6, rtol=1e-5)


def test_zero3_without_the_leaf_setting_in_the_users_deepspeed_config_completes(workspace, reference, engine_runs,
                                                                                 tmp_path):
    """A user's own DeepSpeed JSON without the MoE-block leaf line: the project sets the leaf modules itself."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    deepspeed_json = tmp_path / "ds_zero3.json"
    deepspeed_json.write_text(json.dumps({
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "train_batch_size": "auto",
    }))  # fmt: skip
    config = tmp_path / "zero3_user.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {deepspeed_json}\n  zero3_init_flag: true\n"
        "num_machines: 1\nnum_processes: 2\nmachine_rank: 0\nrdzv_backend: static\nsame_network: true\n"
    )
    completed, _, results = engine_runs("zero3", config, modes=("esft",))
    assert_launch_succeeded(completed, "zero3 (user DeepSpeed JSON)")
    assert results["esft"]["losses"] == pytest.approx(reference("esft")["losses"], rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------- configs


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


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
