"""Chaos in the suite: a few seeded runs of the real stack (control plane, node agent, moto S3
behind the fault proxy, the operator process, trainer processes) with upload kills, download kills
and operator restarts among the disruptions; every run must end Succeeded, bitwise equal to an
uninterrupted run. `benchmarks/chaos.py` runs the same engine with many more runs.
"""

from __future__ import annotations

import json

import pytest

from loraresume_sandbox.chaos import (
    KINDS,
    NORMALIZED_FILES,
    TRAINER_ENDING,
    Variant,
    adapter_differences,
    plan_run,
    plan_runs,
    run_session,
)

SEED = 3258  # 3 runs: operator restarts; an upload kill (2nd checkpoint), then a download kill; 3 attempts in all
REQUIRED = ("upload_kill", "download_kill", "operator_restart")


def test_plans_are_a_function_of_the_seed_and_well_formed():
    plans = plan_runs(7, 200)
    assert plans == plan_runs(7, 200)
    assert plans != plan_runs(8, 200)
    seen = set()
    for plan in plans:
        assert 1 <= len(plan.disruptions) <= 4
        for before, d in zip((None, *plan.disruptions), plan.disruptions, strict=False):
            seen.add(d.kind)
            if d.kind == "download_kill" or d.window == "relaunch":  # only a resumed attempt downloads
                assert before is not None and before.kind in TRAINER_ENDING
            assert 2 <= d.file_index <= 8 and 0 <= d.downtime <= 3 and d.nth_checkpoint in (1, 2)
    assert seen == set(KINDS)
    assert plan_run(5, 1234) == plan_run(5, 1234)


def test_adapter_comparison_is_bytewise_except_the_known_nondeterministic_files():
    config = {"r": 8, "target_modules": ["q_proj", "v_proj", "k_proj"], "base_model_name_or_path": "s3://b/m/"}
    shuffled = {**config, "target_modules": ["k_proj", "q_proj", "v_proj"]}
    ref = {
        "adapter_model.safetensors": b"weights",
        "adapter_config.json": json.dumps(config).encode(),
        "README.md": b"---\nbase_model: /pod-a/work/cache/base-1\n---\ncard",
    }
    same = {
        **ref,
        "adapter_config.json": json.dumps(shuffled).encode(),
        "README.md": b"---\nbase_model: /pod-b/work/cache/base-1\n---\ncard",
    }
    assert set(NORMALIZED_FILES) == {"adapter_config.json", "README.md"}
    assert adapter_differences(same, ref) == []
    assert adapter_differences(same, ref, strict=True) == ["README.md", "adapter_config.json"]
    assert adapter_differences({**same, "adapter_model.safetensors": b"weightz"}, ref) == ["adapter_model.safetensors"]
    other_rank = {**config, "r": 16}
    assert adapter_differences({**ref, "adapter_config.json": json.dumps(other_rank).encode()}, ref) == [
        "adapter_config.json"
    ]
    assert adapter_differences({k: v for k, v in ref.items() if k != "README.md"}, ref) == ["README.md (missing)"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_seeded_chaos_runs_succeed_bitwise_equal(tmp_path):
    plans = plan_runs(SEED, 3, variants=(Variant(30, 3),))
    assert set(REQUIRED) <= {d.kind for plan in plans for d in plan.disruptions}
    summary = run_session(plans, tmp_path / "chaos", seed=SEED, run_timeout=600)
    print(summary.report(seed=SEED))
    lines = "\n".join(r.line() for r in summary.results)
    assert summary.failures == 0 and summary.mismatches == 0, lines
    by_kind = summary.by_kind()
    for kind in REQUIRED:
        planned, delivered, hit = by_kind[kind]
        assert hit >= 1, f"{kind}: planned {planned}, delivered {delivered}, hit {hit}\n{lines}"
    assert not [r.accounting for r in summary.results if r.accounting], lines
