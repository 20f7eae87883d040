"""labkit.measure.bench on a tiny random model with the real tokenizer: the result JSON keeps its shape, its
ratios are computed from its own rows, and greedy methods agree token for token.

The model is a random 10-layer, 16-wide Llama over SmolLM2's 49152-token vocabulary (10 layers so
the default `layer-skip` drafter, 8 layers, fits). Timings on it are meaningless; shapes and ratios
are not.
"""

from __future__ import annotations

import json

import pytest

from labkit.__main__ import main
from labkit.core.errors import LabkitError
from labkit.measure.bench import (DEFAULT_METHODS, SHIPPED_METHODS, default_methods, format_speedup, format_table,
                                   run_bench, speedup_interval)
from labkit.pipeline.prompt_sets import load_prompts
from labkit.core.sampling import SamplingParams
from labkit.model.target import load_target

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_TOKENS = 8
TOP_KEYS = {"model", "device", "dtype", "temperature", "max_new_tokens", "prompt_set", "rows"}
METHODS = DEFAULT_METHODS + ("spec:layer-skip",)  # every training-free method
ROW_KEYS = {"method", "drafter", "tokens_per_s", "tau", "speedup_vs_hf", "n_prompts", "new_tokens"}
TEXTS = ["What is 7 * 8?", "Write a Python function that adds two numbers.", "Name three colours."]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "mixed.jsonl"
    rows = [{"turns": [TEXTS[0], "and then?"], "domain": "math"}, {"turns": [TEXTS[1]], "domain": "code"},
            {"turns": [TEXTS[2]]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_target(tiny_model_dir):
    return load_target(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def greedy_result(tiny_target, prompt_file):
    prompts = load_prompts([prompt_file])
    return run_bench(tiny_target, prompts, METHODS, max_new_tokens=NEW_TOKENS, progress=False)


def check_shape(result: dict, n_prompts: int, methods=METHODS) -> None:
    assert TOP_KEYS <= set(result)
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["max_new_tokens"] == NEW_TOKENS
    assert [row["method"] for row in result["rows"]] == list(methods)
    for row in result["rows"]:
        assert ROW_KEYS <= set(row), f"row {row['method']} lacks {ROW_KEYS - set(row)}"
        assert row["n_prompts"] == n_prompts
        assert 0 < row["new_tokens"] <= n_prompts * NEW_TOKENS
        assert row["tokens_per_s"] > 0
    json.dumps(result)  # JSON-ready


def test_load_prompts_takes_first_turns_and_domains(prompt_file):
    prompts = load_prompts([prompt_file])
    assert [p.text for p in prompts] == TEXTS
    assert [p.domain for p in prompts] == ["math", "code", "mixed"]  # row, row, file stem
    assert len(load_prompts([prompt_file], limit=2)) == 2


def test_bench_result_has_the_documented_shape(greedy_result):
    check_shape(greedy_result, n_prompts=3)
    assert greedy_result["temperature"] == 0.0
    assert greedy_result["model"]


def test_bench_speedups_are_ratios_to_hf_generate_of_the_same_run(greedy_result):
    rows = {row["method"]: row for row in greedy_result["rows"]}
    hf_tps = rows["hf-generate"]["tokens_per_s"]
    assert rows["hf-generate"]["speedup_vs_hf"] == pytest.approx(1.0)
    for row in rows.values():
        assert row["speedup_vs_hf"] == pytest.approx(row["tokens_per_s"] / hf_tps, rel=1e-9)
        assert row["tokens_per_s"] == pytest.approx(row["new_tokens"] / row["seconds"], rel=1e-9)


def test_bench_speedup_intervals_come_from_its_own_prompts(greedy_result):
    """Each row keeps (tokens, seconds) per prompt; its ratio to HF generate recomputed from them is the
    row's speedup, its interval holds it, and a speculative row keeps its rounds per prompt for tau."""
    rows = {row["method"]: row for row in greedy_result["rows"]}
    base = rows["hf-generate"]
    assert base["speedup_interval"] is None and format_speedup(base) == "1.00x (the baseline)"
    for method, row in rows.items():
        assert len(row["per_prompt"]) == 3 and sum(t for t, _ in row["per_prompt"]) == row["new_tokens"]
        if method == "hf-generate":
            continue
        iv = speedup_interval([tuple(x) for x in row["per_prompt"]], [tuple(x) for x in base["per_prompt"]])
        ratio, low, high = iv.value, iv.low, iv.high
        assert ratio == pytest.approx(row["speedup_vs_hf"], rel=1e-9) and row["speedup_interval"] == [low, high]
        assert low <= ratio <= high and f"{ratio:.2f}x [{low:.2f}-{high:.2f}] over 3 prompts, " in format_speedup(row)
        if method.startswith("spec:"):
            emitted, n = map(sum, zip(*row["per_prompt_rounds"]))
            assert emitted / n == pytest.approx(row["tau"])
    with pytest.raises(LabkitError, match="same prompts"):
        speedup_interval([(4, 1.0)], [(4, 1.0), (4, 2.0)])


def test_speedup_interval_on_hand_made_timings():
    # method twice as fast on every prompt: ratio 2 and no spread; mixed prompts: an interval around it
    base = [(10, 1.0), (10, 2.0), (10, 4.0)]
    same = speedup_interval([(10, 0.5), (10, 1.0), (10, 2.0)], base)
    assert (same.value, same.low, same.high, same.n) == (pytest.approx(2.0), pytest.approx(2.0), pytest.approx(2.0), 3)
    mixed = speedup_interval([(10, 0.4), (10, 1.5), (10, 2.0)], base)
    assert mixed.low < mixed.value < mixed.high and mixed.low < 2.0


def test_bench_tau_only_for_speculative_methods(greedy_result):
    for row in greedy_result["rows"]:
        if row["method"].startswith("spec:"):
            assert row["drafter"] == row["method"].split(":", 1)[1]
            assert row["tau"] is not None and row["tau"] >= 1.0
        else:
            assert row["drafter"] is None and row["tau"] is None


def test_bench_greedy_methods_agree_token_for_token(greedy_result):
    """Greedy, fp32: HF generate, HF prompt lookup and both speculative loops all reproduce the lab's
    AR output on every prompt (and the layer-skip drafter did get drafts accepted)."""
    rows = {row["method"]: row for row in greedy_result["rows"]}
    assert rows["spec:layer-skip"]["tau"] > 1.0
    for method, row in rows.items():
        if method != "ar":
            assert row["identical_to_ar"] == "3/3", method
        assert row["new_tokens"] == rows["ar"]["new_tokens"]


def test_format_table_lists_every_method(greedy_result):
    table = format_table(greedy_result)
    for method in METHODS:
        assert method in table
    assert "prompts: files in" in table
    assert "math" in table and "code" in table
    ar = next(r for r in greedy_result["rows"] if r["method"] == "ar")
    line = next(x for x in table.splitlines() if x.startswith("ar "))
    assert f"{ar['speedup_interval'][0]:.2f}-{ar['speedup_interval'][1]:.2f}" in line and "95% interval" in table


def test_bench_sampled_run_has_same_shape(tiny_target, prompt_file):
    methods = ("hf-generate", "ar", "spec:prompt-lookup")
    result = run_bench(tiny_target, load_prompts([prompt_file], limit=2), methods=methods, max_new_tokens=NEW_TOKENS,
                       params=SamplingParams(0.8, 0.9), progress=False)
    check_shape(result, n_prompts=2, methods=methods)
    assert result["temperature"] == 0.8
    assert all(not key.startswith("identical_to") for row in result["rows"] for key in row)


def test_cli_bench_writes_json(tiny_model_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "results" / "bench.json"
    rc = main(["bench", "--prompts", str(prompt_file), "--limit", "2", "--target", str(tiny_model_dir),
               "--device", "cpu", "--max-new-tokens", str(NEW_TOKENS), "--json", str(out)])
    stdout, stderr = capsys.readouterr()
    assert rc == 0
    result = json.loads(out.read_text())
    check_shape(result, n_prompts=2, methods=DEFAULT_METHODS)  # a model without shipped drafters
    assert result["prompt_set"]["files"] == {"mixed": 2}
    assert "hf-generate" in stdout and f"wrote {out}" in stderr
    assert not list(out.parent.glob("*.tmp"))


def test_default_methods_add_the_shipped_dspark_and_its_hybrid_where_the_target_has_them():
    assert default_methods(None) == DEFAULT_METHODS + SHIPPED_METHODS == default_methods("SmolLM2-135M-Instruct")
    assert SHIPPED_METHODS == ("spec:dspark", "spec:hybrid:dspark")
    assert default_methods("a-model-without-drafters") == DEFAULT_METHODS


def test_cli_bench_without_prompts_measures_the_lab_set_and_names_it(tiny_model_dir, tmp_path, capsys,
                                                                      nothing_beside):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--limit", "1", "--methods", "hf-generate", "ar", "--target", str(tiny_model_dir),
               "--device", "cpu", "--max-new-tokens", "4", "--json", str(out)])
    _, stderr = capsys.readouterr()
    assert rc == 0, stderr
    result = json.loads(out.read_text())
    assert result["prompt_set"] == {"sets": ["the lab's own evaluation set (data/eval)"],
                                    "files": {"math": 2, "code": 2, "chat": 1}, "domains": {"math": 2, "code": 2,
                                                                                            "chat": 1}}
    assert "prompt set: the lab's own evaluation set" in stderr


def test_cli_generate_json(tiny_model_dir, capsys):
    rc = main(["generate", "--prompt", "Say hi.", "--target", str(tiny_model_dir), "--device", "cpu",
               "--drafter", "layer-skip:4", "--max-new-tokens", "6", "--json"])
    stdout, _ = capsys.readouterr()
    assert rc == 0
    result = json.loads(stdout)
    assert len(result["token_ids"]) <= 6 and result["drafter"] == "layer-skip:4" and result["tau"] >= 1.0


def test_tau_by_domain_pools_rounds_within_a_domain():
    from types import SimpleNamespace

    from labkit.measure.bench import tau_by_domain
    from labkit.pipeline.prompt_sets import Prompt
    from labkit.core.trace import Round
    prompts = [Prompt("a", "math", "x"), Prompt("b", "math", "x"), Prompt("c", "chat", "y")]
    results = [SimpleNamespace(rounds=[Round(4, 3, 0, 0)]), SimpleNamespace(rounds=[Round(4, 0, 0, 0)] * 3),
               SimpleNamespace(rounds=[Round(2, 1, 0, 0)])]
    assert tau_by_domain(prompts, results) == {"math": (4 + 1 + 1 + 1) / 4, "chat": 2.0}


def test_speculative_rows_count_the_rounds_behind_each_position(greedy_result):
    """position_rounds sits beside position_acceptance (overall and by domain), one count per position."""
    from labkit.core.trace import MIN_ROUNDS, format_acceptance
    for row in greedy_result["rows"]:
        if not row["drafter"]:
            assert row["position_rounds"] is None
            continue
        assert len(row["position_rounds"]) == len(row["position_acceptance"])
        assert all(a >= b for a, b in zip(row["position_rounds"], row["position_rounds"][1:]))  # reach only shrinks
        assert not row["position_rounds"] or row["position_rounds"][0] <= row["rounds"]
        for dom in row["by_domain"].values():
            assert len(dom["position_rounds"]) == len(dom["position_acceptance"])
        format_acceptance(row["position_acceptance"], row["position_rounds"], MIN_ROUNDS)


def test_token_coverage_counts_the_tokens_a_cut_vocabulary_holds():
    from labkit.core.trace import token_coverage
    assert token_coverage([[1, 2, 3], [3, 9]], [1, 3]) == pytest.approx(3 / 5)
    assert token_coverage([], [1]) == 1.0
