"""The GPU benchmark suite (`benchmarks/gpu_suite.py`) at toy dims on CPU: every stage's code path runs end to end
and writes the figures it is meant to, so the one short run on a lent GPU is not where its bugs are found."""

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import gpu_suite  # noqa: E402
from benchmarks.decode import activated_parameters  # noqa: E402
from modeling_deepseekmoe import DeepseekMoEConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

TINY = ["--tiny", "--device", "cpu"]


def read_report(output_dir: Path) -> tuple[dict, str]:
    stem = output_dir / "gpu_suite_tiny_cpu"
    return json.loads(stem.with_suffix(".json").read_text()), stem.with_suffix(".md").read_text()


def stage_rows(report: dict, name: str) -> list[dict]:
    return next(record for record in report["stages"] if record["stage"] == name)["rows"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("gpu_suite")
    # Fake peaks, so the fraction-of-peak / fraction-of-bound columns are computed off a GPU too.
    argv = [
        *TINY,
        "--isolate",
        "no",
        "--output_dir",
        str(output_dir),
        "--peak_tflops",
        "1",
        "--bandwidth_tb_s",
        "0.01",
    ]
    returncode = gpu_suite.main(argv)
    report, markdown = read_report(output_dir)
    return returncode, report, markdown


def test_every_stage_runs_and_the_report_names_the_machine(tiny_run):
    returncode, report, markdown = tiny_run
    statuses = {record["stage"]: record["status"] for record in report["stages"]}
    assert statuses == {name: "ok" for name in gpu_suite.STAGE_NAMES}, [r.get("error") for r in report["stages"]]
    assert returncode == 0
    env = report["environment"]
    for field in ("device_name", "torch", "transformers", "date", "peak_bf16_tflops", "bandwidth_tb_s"):
        assert env[field], field
    assert markdown.startswith(f"# GPU readiness suite on {env['device_name']}")
    assert "## Phase timings" in markdown and "`--tiny` run" in markdown
    for stage in gpu_suite.STAGES:
        assert f"| {stage.name} | ok |" in markdown
        assert f"(`{stage.name}`: ok)" in markdown


def test_calibration_and_moe_block_figures(tiny_run):
    _, report, _ = tiny_run
    calibration = stage_rows(report, "calibration")
    assert [row["unit"] for row in calibration] == ["TFLOP/s", "TB/s"]
    assert all(row["value"] > 0 and row["fraction_of_datasheet"] > 0 for row in calibration)

    rows = stage_rows(report, "moe_block")
    cases = {(row["mode"], row["implementation"]) for row in rows}
    assert cases == {(mode, impl) for mode in ("forward", "fwd+bwd") for impl in ("reference", "auto", "sorted_loop")}
    for row in rows:
        assert row["tokens"] == 32 and row["median_ms"] > 0 and row["model_tflops"] > 0
        assert row["fraction_of_peak"] == pytest.approx(row["model_tflops"], rel=1e-2)  # --peak_tflops 1
        assert row["max_abs_diff_vs_reference"] < 1e-2  # bf16 outputs of the same weights
        if row["implementation"] == "reference":
            assert row["speedup_vs_reference"] == 1


def test_decode_rows_against_the_bandwidth_bound(tiny_run):
    _, report, _ = tiny_run
    eager, compiled = stage_rows(report, "decode_bf16")[0], stage_rows(report, "decode_compiled")[0]
    config = DeepseekMoEConfig(**gpu_suite.TINY_DIMS, num_hidden_layers=gpu_suite.TINY_FULL_LAYERS)
    for row in (eager, compiled):
        assert row["layers"] == gpu_suite.TINY_FULL_LAYERS and row["new_tokens"] == 4
        assert row["tokens_per_s"] > 0 and row["prefill_s"] > 0
        assert row["activated_gb_per_token"] == pytest.approx(2 * activated_parameters(config) / 1e9, rel=1e-3)
        assert row["fraction_of_bound"] == pytest.approx(row["tokens_per_s"] / row["bound_tokens_per_s"], rel=1e-2)
    assert compiled["compiled"] is True
    assert "StaticCache" in compiled["path"] and "DynamicCache" in eager["path"]


def test_quantized_rows_extrapolate_to_the_computed_footprint(tiny_run):
    _, report, _ = tiny_run
    rows = {row["precision"]: row for row in stage_rows(report, "quantized")}
    assert set(rows) == {"bf16", "nf4", "nf4-dq"}
    for precision, row in rows.items():
        assert "error" not in row and "skipped" not in row, row
        assert row["layers"] == gpu_suite.TINY_REDUCED_LAYERS
        # measured bytes of the reduced model + the missing MoE layers == the footprint computed for full depth
        assert row["full_weights_gb_est"] == pytest.approx(row["full_weights_gb_computed"], rel=1e-2), precision
        assert 0 < row["full_tokens_per_s_est"] < row["tokens_per_s"]
        assert row["moe_layer_ms_per_token"] > 0 and row["full_fraction_of_bound"] > 0
    assert rows["nf4-dq"]["weights_gb"] < rows["bf16"]["weights_gb"] / 1.5
    assert rows["nf4"]["full_activated_gb_per_token"] < rows["bf16"]["full_activated_gb_per_token"]


def test_train_and_esft_rows(tiny_run):
    _, report, _ = tiny_run
    train = {row["mode"]: row for row in stage_rows(report, "train")}
    assert set(train) == {"lora", "qlora"}
    for row in train.values():
        assert "error" not in row, row
        assert row["step_seconds"] > 0 and row["trainable_params"] > 0 and row["seq_len"] == 32

    esft = {(row["variant"], row["how"]): row for row in stage_rows(report, "esft_memory")}
    assert set(esft) == {(v, h) for v in ("full fine-tuning", "ESFT") for h in ("computed", "measured")}
    for variant in ("full fine-tuning", "ESFT"):
        measured = esft[(variant, "measured")]
        assert "error" not in measured, measured
        assert measured["matches_computed"] is True
        assert measured["adamw_state_gb"] == pytest.approx(2 * measured["grad_gb"], rel=1e-2)  # two bf16 states
    assert esft[("ESFT", "computed")]["trainable_params"] < esft[("full fine-tuning", "computed")]["trainable_params"]
    assert esft[("ESFT", "measured")]["adamw_state_gb"] < esft[("full fine-tuning", "measured")]["adamw_state_gb"]


def test_activated_bytes_match_the_decode_benchmark_at_16b():
    config = DeepseekMoEConfig()
    bf16 = gpu_suite.activated_bytes_per_token(config, "bf16")
    assert bf16 == 2 * activated_parameters(config)
    nf4 = gpu_suite.activated_bytes_per_token(config, "nf4")
    lm_head = 2 * config.vocab_size * config.hidden_size
    assert lm_head < nf4 < lm_head + (bf16 - lm_head) / 3  # 4-bit projections, bf16 LM head


def test_stages_that_do_not_fit_the_budget_are_skipped_with_a_note(tmp_path):
    argv = [*TINY, "--isolate", "no", "--output_dir", str(tmp_path), "--stages", "calibration", "moe_block",
            "--budget_s", "3"]  # fmt: skip
    assert gpu_suite.main(argv) == 0
    report, markdown = read_report(tmp_path)
    assert [record["status"] for record in report["stages"]] == ["skipped", "skipped"]
    assert all("needs at least" in record["notes"][0] for record in report["stages"])
    assert "| calibration | skipped |" in markdown


def test_an_isolated_stage_runs_in_its_own_process(tmp_path):
    argv = [*TINY, "--isolate", "yes", "--output_dir", str(tmp_path), "--stages", "calibration"]
    assert gpu_suite.main(argv) == 0
    report, _ = read_report(tmp_path)
    assert report["isolated_stages"] is True
    (record,) = report["stages"]
    assert record["status"] == "ok" and len(record["rows"]) == 2


def test_an_isolated_stage_is_killed_when_its_time_is_up(tmp_path):
    stage = next(s for s in gpu_suite.STAGES if s.name == "calibration")
    record = gpu_suite.run_stage_isolated(stage, TINY, seconds=0.5, scratch_dir=tmp_path)
    assert record["status"] == "timeout" and "killed after" in record["error"]
    assert record["rows"] == []
