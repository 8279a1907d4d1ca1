"""The ESFT-vs-LoRA-vs-FFT benchmark (`benchmarks/esft_vs_lora.py`) at its smallest setting: it trains every method
through the shipped entry points (`run_sft` for FFT and LoRA, `run_esft` for the ESFT family), writes the JSON the
report renders from, and the report and plot render from that JSON alone."""

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from deepseekmoe.finetune import sft
from deepseekmoe.finetune.esft import train as esft_train

from benchmarks import esft_report, esft_vs_lora

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def smallest_run(tmp_path_factory):
    calls = {"run_sft": [], "run_esft": []}
    original_sft, original_esft = sft.run_sft, esft_train.run_esft

    def counting_sft(model_args, data_args, training_args, **kwargs):
        calls["run_sft"].append("peft" if model_args.use_peft else "full")
        return original_sft(model_args, data_args, training_args, **kwargs)

    def counting_esft(model_args, data_args, training_args, esft_args, **kwargs):
        calls["run_esft"].append(json.loads(Path(esft_args.expert_config).read_text()))
        return original_esft(model_args, data_args, training_args, esft_args, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(sft, "run_sft", counting_sft)
    patch.setattr(esft_train, "run_esft", counting_esft)
    directory = tmp_path_factory.mktemp("esft_benchmark")
    try:
        results = esft_vs_lora.main(["--setting", "smallest", "--output", str(directory / "esft_vs_lora.json"),
                                     "--report", str(directory / "report.md")])
    finally:
        patch.undo()
    return results, calls, directory


def test_every_method_trains_through_the_shipped_entry_points(smallest_run):
    results, calls, _ = smallest_run
    setting = esft_vs_lora.SETTINGS["smallest"]
    tasks, seeds = len(setting.tasks), len(setting.seeds)
    # One LR per method at this setting: FFT and LoRA through run_sft, ESFT-Token/Gate and both diagnostics through
    # run_esft, for every task and seed.
    assert sorted(calls["run_sft"]) == sorted(["full", "peft"] * tasks * seeds)
    assert len(calls["run_esft"]) == 4 * tasks * seeds
    num_experts = results["model"]["n_routed_experts"]
    assert any(all(len(ids) == num_experts for ids in config["experts"].values()) for config in calls["run_esft"])
    for task in results["tasks"].values():
        methods = {run["method"] for run in task["final"] + task["diagnostics"]}
        assert methods == set(esft_vs_lora.METHODS + esft_vs_lora.DIAGNOSTICS)
        fft = next(run for run in task["final"] if run["method"] == "FFT")
        for run in task["final"] + task["diagnostics"]:
            assert 0 <= run["exact_match"] <= 1 and run["trainable_parameters"] > 0 and run["stored_bytes"] > 0
            if run["method"] != "FFT":
                assert run["trainable_parameters"] < fft["trainable_parameters"]
        token = next(run for run in task["final"] if run["method"] == "ESFT-Token")
        assert token["stored_bytes"] < fft["stored_bytes"] / 4


def test_json_is_written_and_the_report_renders_from_it(smallest_run, tmp_path):
    results, _, directory = smallest_run
    written = json.loads((directory / "esft_vs_lora.json").read_text())
    assert written["tasks"].keys() == results["tasks"].keys() == {"new_facts", "new_operator"}
    report = (directory / "report.md").read_text()
    assert (directory / "esft_vs_lora_gain_vs_forgetting.png").stat().st_size > 1000
    for task in written["tasks"]:
        assert f"## Task: {esft_report.TASK_TITLES[task]}" in report
    assert "ESFT-Token reaches" in report and "ESFT-Gate reaches" in report and "Protocol (fixed" in report
    # The report step alone, from the JSON alone, gives the same markdown.
    again = esft_report.render(directory / "esft_vs_lora.json", tmp_path / "again.md",
                               plot_path=tmp_path / "again.png")
    assert again.read_text().replace("again.png", "esft_vs_lora_gain_vs_forgetting.png") == report.replace(
        "](esft_vs_lora.json)", "](" + str(directory / "esft_vs_lora.json") + ")").replace(
        "[`esft_vs_lora.json`]", "[`" + str(directory / "esft_vs_lora.json") + "`]")


def test_share_of_fft_gain_is_computed_per_seed_against_the_base():
    task = {
        "base_by_seed": {"0": {"exact_match": 0.1}, "1": {"exact_match": 0.2}},
        "final": [{"method": "FFT", "seed": 0, "exact_match": 0.9}, {"method": "FFT", "seed": 1, "exact_match": 1.0},
                  {"method": "ESFT-Token", "seed": 0, "exact_match": 0.5},
                  {"method": "ESFT-Token", "seed": 1, "exact_match": 0.6}],
        "diagnostics": [],
    }
    assert esft_report.share_of_fft(task, "ESFT-Token") == pytest.approx(0.5)
    assert esft_report.verdict(0.85) == "held" and esft_report.verdict(0.6) == "partly held"
    assert esft_report.verdict(0.2) == "did not hold"
