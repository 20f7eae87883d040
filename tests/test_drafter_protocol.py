"""The drafter protocol (labkit/drafters/base.py) is the real one: every drafter kind declares what
its callers read, and every caller (the decode loop, the bench, the batched engine, the serving
dashboard) works with every kind through those declarations alone.

The kinds, on one small random Llama with the default target's tokenizer: prompt lookup, layer skip,
DFlash and DSpark checkpoints (saved, so that they go through `make_drafter` by path as a user's
would), the hybrid on DSpark and the confidence-scheduled DSpark (sched:).
"""

from __future__ import annotations

import pytest

from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams
from labkit.core.scheduler import CostTable
from labkit.decode.engine import make_requests, run_closed_loop
from labkit.decode.loop import generate
from labkit.drafters import make_drafter
from labkit.drafters.base import Drafter
from labkit.drafters.checkpoint import save_drafter
from labkit.drafters.dflash import DFlashConfig
from labkit.drafters.dspark import DSparkConfig
from labkit.lab.serving_views import ServingDashboard
from labkit.measure.bench import run_bench
from labkit.model.target import load_target
from labkit.pipeline.prompt_sets import Prompt
from labkit.pipeline.train import new_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [Prompt("What is 7 * 8?", "math", "t"), Prompt("Name three colours, then name them again.", "chat", "t")]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def target(tiny_model_dir):
    return load_target(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def specs(target, tmp_path_factory) -> dict[str, str]:
    """Every drafter kind as the spec string a user passes (checkpoints by path)."""
    folder = tmp_path_factory.mktemp("drafters")
    cfgs = {"dflash": DFlashConfig.for_target(target, gamma=4, target_layers=(1, 2), draft_vocab=512),
            "dspark": DSparkConfig.for_target(target, gamma=4, target_layers=(1, 2), rank=4, draft_vocab=512)}
    paths = {}
    for kind, cfg in cfgs.items():
        model = new_backbone(target, cfg, init_from_target=False)
        paths[kind] = str(save_drafter(model, folder / kind))
    return {"prompt-lookup": "prompt-lookup", "layer-skip": "layer-skip:2", "dflash": paths["dflash"],
            "dspark": paths["dspark"], "hybrid": f"hybrid:{paths['dspark']}", "sched": f"sched:{paths['dspark']}"}


KINDS = ("prompt-lookup", "layer-skip", "dflash", "dspark", "hybrid", "sched")
SINGLE_REQUEST_ONLY = {"layer-skip", "sched"}


@pytest.mark.parametrize("kind", KINDS)
def test_every_drafter_declares_what_its_callers_read(target, specs, kind):
    d = make_drafter(specs[kind], target)
    assert isinstance(d, Drafter)
    assert isinstance(d.name, str) and d.name
    assert d.vocab_size == target.vocab_size
    assert isinstance(d.gamma, int) and d.gamma >= 1
    assert isinstance(d.hidden_layers, tuple)
    assert isinstance(d.needs_target_cache, bool) and isinstance(d.batchable, bool)
    assert d.has_confidences == (kind in ("dspark", "hybrid", "sched"))
    assert (d.needs_target_cache or not d.batchable) == (kind in SINGLE_REQUEST_ONLY)
    vocab = d.draft_vocab()
    assert (vocab is None) == (kind in ("prompt-lookup", "layer-skip"))
    if vocab is not None:
        assert len(vocab) == 512
    params = SamplingParams(1.0)
    temps = d.temperatures(params)
    assert temps is None or len(temps) == d.gamma


@pytest.mark.parametrize("kind", KINDS)
def test_every_drafter_decodes_losslessly_through_generate(target, specs, kind):
    """Greedy fp32: the speculative output equals plain greedy decoding, whatever the drafter."""
    d = make_drafter(specs[kind], target)
    ids = target.encode_prompt(PROMPTS[1].text)
    plain = generate(target, ids, None, NEW_TOKENS, SamplingParams())
    spec = generate(target, ids, d, NEW_TOKENS, SamplingParams())
    assert spec.token_ids == plain.token_ids
    assert all(r.proposed <= d.gamma for r in spec.rounds)


def test_every_drafter_runs_in_the_bench(target, specs):
    methods = ["ar"] + [f"spec:{specs[k]}" for k in KINDS]
    result = run_bench(target, PROMPTS, methods, max_new_tokens=NEW_TOKENS, progress=False)
    rows = {r["method"]: r for r in result["rows"]}
    for kind in KINDS:
        row = rows[f"spec:{specs[kind]}"]
        assert row["identical_to_ar"] == "2/2", kind
        assert ("draft_vocab_coverage" in row) == (kind not in ("prompt-lookup", "layer-skip")), kind


def served_or_refused(target, specs, kind, serve):
    """serve(drafter, requests) for a batchable kind; for the others, the refusal that names the drafter."""
    d = make_drafter(specs[kind], target)
    requests = make_requests(target, PROMPTS, NEW_TOKENS, SamplingParams(), seed=0)
    if kind in SINGLE_REQUEST_ONLY:
        with pytest.raises(LabkitError, match=d.name):
            serve(d, requests)
        return d, None
    return d, serve(d, requests)


@pytest.mark.parametrize("kind", KINDS)
def test_the_engine_serves_every_batchable_drafter_and_refuses_the_others_by_name(target, specs, kind):
    _, rep = served_or_refused(target, specs, kind,
                               lambda d, reqs: run_closed_loop(target, d, reqs, 2, "algorithm1", CostTable.flat()))
    if rep is not None:
        solo = {i: generate(target, target.encode_prompt(p.text), None, NEW_TOKENS, SamplingParams()).token_ids
                for i, p in enumerate(PROMPTS)}
        assert {r["id"]: r["token_ids"] for r in rep["requests"]} == solo


@pytest.mark.parametrize("kind", KINDS)
def test_the_serving_dashboard_takes_every_batchable_drafter(target, specs, kind):
    """Prompt lookup included: its block length is declared, not guessed."""
    d, dash = served_or_refused(target, specs, kind,
                                lambda d, reqs: ServingDashboard(target, d, reqs, CostTable.flat()))
    if dash is not None:
        assert dash.gamma == d.gamma and dash.controls["max_draft"].max == d.gamma
