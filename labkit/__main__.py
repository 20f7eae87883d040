"""Command line: `python -m labkit {setup,generate,bench,prepare-data,train,calibrate,export,eval,serve,notebooks,
benchmarks fetch,record-traces,simulate} ...`.

Every bad input exits non-zero with one line on stderr that names the fix, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from labkit.core.errors import LabkitError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        command = " ".join(self.prog.split()[1:])  # "bench", or "benchmarks fetch" for a nested command
        self.exit(2, f"labkit: {message} (see `python -m labkit {command + ' ' if command else ''}--help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, help="HF causal LM id or local path (default: SmolLM2-135M-Instruct, offline)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--dtype", default="float32", help="float32 (reference: greedy equality holds), bfloat16 or float16")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1 = off")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128, help="tokens to generate per prompt")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--gamma", type=_positive_int, default=None, help="most tokens a drafter proposes per round")


def _add_prompt_args(p: argparse.ArgumentParser, default_limit: int) -> None:
    p.add_argument("--prompts", nargs="+", default=None,
                   help='JSONL files of {"turns": [...]} rows, first turns (default: the evaluation set below)')
    p.add_argument("--benchmarks", default=None,
                   help="folder of public benchmark files (gsm8k.jsonl, ...; `benchmarks fetch` writes one) or 'lab' "
                        "for the lab's own set (default: $LABKIT_BENCHMARKS, else a shared/benchmarks folder beside "
                        "the checkout or build/benchmarks where present, else the lab's own set in data/eval)")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help=f"prompts taken from each file (default: all of --prompts; {default_limit} a file of the set)")
    p.set_defaults(default_limit=default_limit)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """The options of `train`: one per field of labkit.pipeline.train.TrainJob, by the same name
    (dest), with the default written there."""
    from labkit.pipeline.train import ANCHOR_MODES, DRAFTERS, FEATURE_DTYPES, HEADS, MIXED_PRECISIONS, TrainJob as J
    p.add_argument("--drafter", default=J.drafter, choices=DRAFTERS,
                   help="dflash (parallel block drafter), dspark (+ sequential and confidence heads) or eagle3 "
                        "(autoregressive on fused target features, trained over --gamma steps)")
    p.add_argument("--head", choices=HEADS, default=J.head, help="DSpark's sequential head")
    p.add_argument("--rank", type=int, default=J.rank, help="DSpark's head rank r (0 = no sequential head)")
    p.add_argument("--data", nargs="+", default=list(J.data),
                   help=f"one or more folders made by prepare-data (default: {' '.join(J.data)})")
    p.add_argument("--max-shards", type=_positive_int, default=J.max_shards,
                   help="train on the first N data shards of each --data folder only (default: all)")
    p.add_argument("--out", required=True, help="run folder: checkpoints (last/), metrics.jsonl; resumed if present")
    p.add_argument("--target", default=J.target, help="HF causal LM id or local path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=J.device, help="cuda, mps or cpu (accelerate launch sets it per process)")
    p.add_argument("--steps", type=_positive_int, default=J.steps, help="optimizer steps in the schedule")
    p.add_argument("--batch-seqs", type=_positive_int, default=J.batch_seqs, help="sequences per step (per process)")
    p.add_argument("--anchors", type=_positive_int, default=J.anchors, help="random anchor blocks per sequence")
    p.add_argument("--lr", type=float, default=J.lr, help="peak learning rate (warm-up then cosine)")
    p.add_argument("--ce-weight", type=float, default=J.ce_weight,
                   help="weight of cross-entropy to the data token (hard labels)")
    p.add_argument("--l1-weight", type=float, default=J.l1_weight,
                   help="weight of the L1 distance to the target's full distribution (soft targets)")
    p.add_argument("--gamma", type=_positive_int, default=J.gamma, help="block size: tokens drafted per forward")
    p.add_argument("--layers", type=_positive_int, default=J.layers, help="draft decoder layers")
    p.add_argument("--target-layers", default=J.target_layers,
                   help="comma-separated target layers read (default: 5 spread)")
    p.add_argument("--draft-vocab", type=int, default=J.draft_vocab,
                   help="score only the K most frequent response tokens (0 = the whole vocabulary)")
    p.add_argument("--anchor-mode", choices=ANCHOR_MODES, default=J.anchor_mode,
                   help="anchor + gamma-1 masks (DSpark) or anchor + gamma masks (original DFlash)")
    p.add_argument("--no-init-from-target", dest="init_from_target", action="store_false", default=J.init_from_target,
                   help="random draft layers instead of the target's last")
    p.add_argument("--qk-norm", action="store_true", default=J.qk_norm,
                   help="per-head RMSNorm of queries and keys (Qwen3-shaped layers; needed by `export`); "
                        "only a target with q/k norms (Qwen3) then has layers to copy in")
    p.add_argument("--frozen-mask", action="store_true", default=J.frozen_mask,
                   help="keep the mask slots' embedding the target's row (as DeepSpec does; needed by `export`)")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, default=J.mixed_precision)
    p.add_argument("--feature-dtype", choices=FEATURE_DTYPES, default=J.feature_dtype,
                   help="precision of the target when it caches its features (bfloat16: about 2x faster on a "
                        "CPU with bf16 units; a cache of its own)")
    p.add_argument("--init-from", default=J.init_from, metavar="DRAFTER",
                   help="go on training a trained drafter (a checkpoint folder of the same kind): its weights, "
                        "shape and draft vocabulary; a new optimizer and schedule")
    p.add_argument("--save-every", type=_positive_int, default=J.save_every, help="steps between checkpoints")
    p.add_argument("--max-minutes", type=float, default=J.max_minutes, help="stop (with a checkpoint) after this long")
    p.add_argument("--seed", type=int, default=J.seed)
    p.add_argument("--export", default=J.export, help="also write a small bf16 copy of the result here")


def _data_defaults():
    from labkit.pipeline.data import DataConfig
    return DataConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="labkit", description="The Speculative Decoding Lab.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("setup", help="convert the default target once so that later loads take < 1 s")
    p.add_argument("--target", default=None, help="model to prepare (default: the default target)")

    p = sub.add_parser("generate", help="generate text for one prompt, with or without a drafter")
    p.add_argument("--prompt", required=True, help="the user's message (goes through the chat template)")
    p.add_argument("--drafter", default="none", help="none, prompt-lookup, layer-skip[:N], dflash, dspark, "
                   "eagle3, hybrid:dspark, sched:dspark (confident prefixes only) or a checkpoint path")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    _add_model_args(p)

    p = sub.add_parser("bench", help="tokens/s of HF generate, HF prompt lookup, the lab's AR and speculative loops")
    _add_prompt_args(p, default_limit=4)
    p.add_argument("--methods", nargs="+", default=None,
                   help="hf-generate, hf-prompt-lookup, ar or spec:<drafter> (default: hf-generate hf-prompt-lookup "
                        "ar spec:prompt-lookup, and spec:dspark spec:hybrid:dspark where the target has shipped drafters)")
    p.add_argument("--hf-lookup-tokens", type=_positive_int, default=3, help="HF's prompt_lookup_num_tokens")
    p.add_argument("--json", dest="json_out", default=None, help="write the result JSON here")
    _add_model_args(p)
    p = sub.add_parser("prepare-data", help="regenerate training responses with the target (resumable)")
    p.add_argument("--out", default="data/train", help="folder of shards (default: data/train)")
    p.add_argument("--target", default=None, help="HF causal LM id or local path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    data = _data_defaults()  # each default written once, in DataConfig
    p.add_argument("--n-prompts", type=_positive_int, default=data.n_prompts, help="training prompts to answer")
    p.add_argument("--max-new-tokens", type=_positive_int, default=data.max_new_tokens, help="longest response")
    p.add_argument("--shard-size", type=_positive_int, default=data.shard_size, help="prompts per shard")
    p.add_argument("--seed", type=int, default=data.seed, help="prompt and sampling seed")
    p.add_argument("--benchmarks", default=None,
                   help="public evaluation prompts that training prompts must not overlap, besides the lab's own "
                        "(default: the folder bench would use; see `bench --help`)")
    p.add_argument("--prompts", choices=("templates", "magpie", "mixed"), default=data.prompts,
                   help="templates (default), magpie (the target writes the user turns) or mixed "
                        "(CHAMP math problems + templates + magpie)")
    p.add_argument("--greedy-share", type=float, default=data.greedy_share,
                   help="fraction of prompts answered greedily instead of sampled (default 0)")
    p.add_argument("--template-share", type=float, default=data.template_share,
                   help="--prompts mixed: share of templated prompts")
    p.add_argument("--dtype", default="float32", help="target precision for data: float32 (default) or bfloat16")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="generation rows per batch, in whole shards (default: one shard; 256-512 on a GPU)")

    p = sub.add_parser("train", help="train a drafter on target-regenerated data (accelerate: CPU, 1 or many GPUs)")
    _add_train_args(p)

    p = sub.add_parser("calibrate", help="fit a DSpark drafter's confidence temperatures (STS) on held-out rounds")
    p.add_argument("--drafter", required=True, help="dspark (the shipped checkpoint) or a DSpark checkpoint path")
    p.add_argument("--data", default="data/train",
                   help="data folder whose last sequences (not trained on) give the prompts (default: data/train)")
    p.add_argument("--n-prompts", type=_positive_int, default=48, help="held-out prompts to decode")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0],
                   help="sampling temperatures to fit, one temperature set each (default: 0 1)")
    p.add_argument("--dry-run", action="store_true", help="report only; leave the checkpoint unchanged")
    p.add_argument("--json", dest="json_out", default=None, help="write the report JSON here")
    _add_model_args(p)

    p = sub.add_parser("export", help="write a drafter in DeepSpec's layout, which vLLM and SGLang load")
    p.add_argument("out", help="folder to write (config.json, model.safetensors, README.md; replaced atomically)")
    p.add_argument("--drafter", required=True, help="dflash, dspark, eagle3, mtp1 (the shipped checkpoints) or a "
                   "checkpoint path")
    p.add_argument("--format", choices=("deepspec",), default="deepspec", help="deepspec (the only one)")
    p.add_argument("--target", default=None,
                   help="the drafter's target: HF id or local path (default: SmolLM2-135M-Instruct)")

    p = sub.add_parser("round-cost", help="T_step, T_verify(k) and T_draft per dtype: stock kernels, packed weights, and grouped attention on top, in one run")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="target dtypes to measure")
    p.add_argument("--ks", nargs="+", type=_positive_int, default=list(range(1, 17)), help="tokens per verify forward")
    p.add_argument("--drafters", nargs="*", default=["dflash", "dspark"], help="drafters whose proposal is timed")
    p.add_argument("--repeats", type=_positive_int, default=7, help="interleaved repeats (medians)")
    p.add_argument("--context", type=_positive_int, default=200, help="tokens already in the cache when timed")
    p.add_argument("--target", default=None, help="HF causal LM id or local path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--json", dest="json_out", default=None, help="write the table as JSON here")

    p = sub.add_parser("notebooks", help="execute the lab's notebooks headlessly and write offline HTML copies")
    p.add_argument("names", nargs="*", help="notebooks to run, by file-name prefix (default: all), e.g. 00 02_dflash")
    p.add_argument("--dir", default="notebooks", help="folder of the notebooks (default: notebooks)")
    p.add_argument("--out", default="build/notebooks", help="where executed copies and HTML go (default: build/notebooks)")
    p.add_argument("--quick", action="store_true", help="quick mode (QUICK=True), as CI runs them")
    p.add_argument("--timeout", type=_positive_int, default=1800, help="seconds a cell may run")

    p = sub.add_parser("serve", help="the batched serving engine: N users, one target forward per step, a prefix policy")
    _add_prompt_args(p, default_limit=4)
    p.add_argument("--policy", default="algorithm1",
                   help="how many drafted tokens of each request to verify: fixed, mtp1, threshold, algorithm1, "
                   "retrospective, async-topk, fixed:K (a static MTP-K) or threshold:T (default: algorithm1)")
    p.add_argument("--users", type=_positive_int, default=4, help="concurrent users (closed loop) or, with --rate, "
                   "the most requests running at once")
    p.add_argument("--drafter", default="dspark", help="dspark (default), dflash, eagle3, prompt-lookup, "
                   "hybrid:dspark, none or a checkpoint path (layer-skip runs single-request only)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--requests", type=_positive_int, default=None, help="requests to serve (default: each prompt once)")
    stop.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals at this many requests/s")
    p.add_argument("--table", default=None, help="cost-table JSON (default: the lab cache's cost_tables.json)")
    p.add_argument("--reprofile", action="store_true", help="profile SPS(B) on this device again and store it")
    p.add_argument("--stream", action="store_true", help="print each request's text as its tokens arrive")
    p.add_argument("--json", dest="json_out", default=None, help="write the report JSON here")
    _add_model_args(p)

    p = sub.add_parser("serve-sweep", help="aggregate and per-user tokens/s of several policies at several loads, interleaved")
    _add_prompt_args(p, default_limit=4)
    p.add_argument("--users", type=_positive_int, nargs="+", default=[1, 2, 4, 8, 16], help="loads to measure")
    p.add_argument("--policies", nargs="+", default=["mtp1", "fixed", "algorithm1"], help="policies to compare; "
                   "POLICY@DRAFTER serves a policy with another drafter, e.g. mtp1@data/drafters/mtp1 (a trained "
                   "one-token drafter under the MTP-1 policy) beside --drafter under the rest; POLICY~MODEL prices "
                   "one arm by another cost model, e.g. algorithm1~rows beside algorithm1")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0], help="0 = greedy")
    p.add_argument("--requests-per-user", type=_positive_int, default=3, help="requests each user serves at every "
                   "load: the same prompt mix (domains interleaved) at every load (default 3)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="runs of every (users, policy) cell, repeats "
                   "outermost and policies interleaved; cells report the median and the min-max (default 3)")
    p.add_argument("--baseline", default="mtp1", help="the policy the others are compared with at matched "
                   "aggregate throughput (default mtp1, the paper's production baseline)")
    p.add_argument("--drafter", default="dspark", help="drafter spec (default: the shipped dspark)")
    p.add_argument("--table", default=None, help="cost-table JSON (default: the lab cache's cost_tables.json)")
    p.add_argument("--reprofile", action="store_true", help="profile SPS(B) on this device again and store it")
    p.add_argument("--cost-model", default="table", help="how Algorithm 1 prices a step: table (the profiled "
                   "SPS(B) table plus the measured drafting, default), fit (the engine's own fit of its past steps), "
                   "offset (the table plus the measured excess), rows (the table at the step's own requests) or "
                   "steps (whole engine steps with --drafter, profiled once and stored beside the table)")
    p.add_argument("--no-recalibrate", dest="recalibrate", action="store_false", help="policies read the drafter's "
                   "confidences as they come, not corrected by the engine's own verdicts (AcceptanceRatio)")
    p.add_argument("--json", dest="json_out", default=None, help="write the reports and the SPS table here")
    _add_model_args(p)

    p = sub.add_parser("record-traces", help="serving traces for `simulate`: solo decoding, whole blocks verified, "
                       "confidences and accept lengths by domain; this CPU's costs")
    _add_prompt_args(p, default_limit=4)
    p.add_argument("--drafter", default="dspark", help="a drafter with a confidence head (default: the shipped dspark)")
    p.add_argument("--mtp1-drafter", default="mtp1", help="the one-token source's drafter, the simulator's MTP-1 "
                   "(default: the shipped trained MTP-1, mtp1; 'first': the --drafter's first position)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0], help="0 = greedy (default: 0 and 1)")
    p.add_argument("--no-costs", dest="costs", action="store_false",
                   help="skip this CPU's costs (SPS(B) table, drafting and prefill times)")
    p.add_argument("--out", default="data/serving/traces.json", help="the trace file to write")
    _add_model_args(p)

    p = sub.add_parser("simulate", help="trace-driven serving simulation past this machine (paper Figs. 7, 8): "
                       "recorded rounds, the scheduler's policies, a CPU table or a GPU roofline model")
    p.add_argument("--traces", default=None, help="a trace file from record-traces "
                   "(default: the shipped data/serving/traces.json)")
    p.add_argument("--table", default="h100", help="cpu (this CPU's costs, stored with the traces), h100 or h200 "
                   "(a roofline model, labelled so), or a JSON file: a simulation cost or a cost table (default h100)")
    p.add_argument("--model", default="8b", help="model size of the roofline model: 135m, 8b or 32b (default 8b)")
    p.add_argument("--context", type=_positive_int, default=1024, help="KV tokens a request reads a step in the "
                   "roofline model (default 1024)")
    p.add_argument("--users", type=_positive_int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256],
                   help="concurrent users (closed loop)")
    p.add_argument("--policies", nargs="+", default=["mtp1", "fixed", "threshold", "algorithm1", "async-topk"],
                   help="policies (mtp1 replays the one-token trace: the trained MTP-1)")
    p.add_argument("--temperatures", type=float, nargs="+", default=None, help="trace temperatures (default: all)")
    p.add_argument("--requests-per-user", type=_positive_int, default=2, help="requests finished per user at each load")
    p.add_argument("--seed", type=int, default=0, help="seed of the domain mix's order")
    p.add_argument("--validate", action="store_true", help="with --table cpu: also run the engine on this CPU at "
                   "each --users (keep them <= 16) and print engine against simulator")
    p.add_argument("--figures", default=None, help="write simulated Fig. 7 and Fig. 8 as HTML into this folder")
    p.add_argument("--json", dest="json_out", default=None, help="write the results JSON here")

    p = sub.add_parser("benchmarks", help="the public evaluation prompt sets: fetch them from the Hugging Face hub")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="fetch", parser_class=_Parser)
    q = verbs.add_parser("fetch", help="download GSM8K, MATH-500, HumanEval, MBPP, MT-Bench and convert them to JSONL")
    q.add_argument("--out", default=None, help="folder to write {set}.jsonl into (default: build/benchmarks, where "
                                               "the lab then finds them)")
    q.add_argument("--sets", nargs="+", default=None,
                   help="sets to fetch (default: gsm8k math500 humaneval mbpp mt-bench)")
    q.add_argument("--endpoint", default=None, help="the dataset viewer's URL (default: $LABKIT_HF_ENDPOINT, else "
                                                    "https://datasets-server.huggingface.co)")

    p = sub.add_parser("eval", help="tau, position-wise acceptance and tokens/s of a drafter on prompt files")
    p.add_argument("--drafter", required=True, help="prompt-lookup, layer-skip[:N], dflash, eagle3 or a "
                   "checkpoint path")
    _add_prompt_args(p, default_limit=4)
    p.add_argument("--vs-hf", action="store_true", help="also time plain HF generate, interleaved, for a speedup")
    p.add_argument("--json", dest="json_out", default=None, help="write the result JSON here")
    _add_model_args(p)

    p = sub.add_parser("table1", help="the paper's Table 1 again: tau of several drafters on every benchmark file "
                                      "at hand, at T = 1 and greedy, with acceptance by position (Fig. 2)")
    p.add_argument("--drafters", nargs="+", default=["dflash", "dspark"],
                   help="drafter specs, each measured on the same prompts (default: dflash dspark; add eagle3 "
                        "once trained, or checkpoint paths)")
    p.add_argument("--temperatures", nargs="+", type=float, default=[1.0, 0.0],
                   help="sampling temperatures (default: 1 0; the paper's table is at 1)")
    p.add_argument("--benchmarks", default=None, help="folder of public benchmark files or 'lab' (as for eval)")
    p.add_argument("--limit", type=_positive_int, default=10, help="prompts from each file (default 10)")
    p.add_argument("--json", dest="json_out", default=None, help="write the result JSON here")
    p.add_argument("--target", default=None, help="HF causal LM id or local path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128, help="tokens to generate per prompt")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    return parser


def _params(args):
    from labkit.core.sampling import SamplingParams
    return SamplingParams(temperature=args.temperature, top_p=args.top_p)


def _target_name(name: str | None) -> str | None:
    """The display name of a packaged target (shipped drafters are filed under it), else None."""
    from labkit.model.target import packaged_target
    spec = packaged_target(name)
    return spec.name if spec is not None else None


def cmd_setup(args) -> None:
    from labkit.model.target import load_target
    target = load_target(args.target)
    print(f"{target.name} ready on {target.device}: {target.num_layers} layers, vocabulary {target.vocab_size}.")


def cmd_generate(args) -> None:
    from labkit.decode.loop import generate
    from labkit.drafters import check_spec, make_drafter
    from labkit.model.target import load_target
    params = _params(args)
    if not args.prompt.strip():
        raise LabkitError("The prompt is empty: pass some text, e.g. --prompt 'What is 7 * 8?'.")
    check_spec(args.drafter)
    target = load_target(args.target, args.device, args.dtype)
    drafter = make_drafter(args.drafter, target, args.gamma)
    result = generate(target, target.encode_prompt(args.prompt), drafter, args.max_new_tokens, params, args.seed)
    if args.json:
        out = result.to_dict()
        out.update(model=target.name, drafter=args.drafter, temperature=args.temperature, top_p=args.top_p)
        print(json.dumps(out))
    else:
        print(result.text)
        print(f"[{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tokens/s, tau {result.tau:.2f}, "
              f"{len(result.rounds)} rounds]", file=sys.stderr)


def _write_json(data: dict, path_text: str) -> None:
    path = Path(path_text)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    print(f"wrote {path}", file=sys.stderr)


def _load_prompts(args):
    """--prompts FILE ... as given, else the evaluation set --benchmarks resolves (named on stderr)."""
    from labkit.pipeline.prompt_sets import load_prompts, prompt_set
    if args.prompts:
        if args.benchmarks is not None:
            raise LabkitError("Pass either --prompts FILE ... or --benchmarks DIR, not both.")
        return load_prompts(args.prompts, args.limit)
    chosen = prompt_set(args.benchmarks)
    prompts = chosen.load(args.limit or args.default_limit)
    print(chosen.describe(prompts), file=sys.stderr)
    return prompts


def cmd_bench(args) -> None:
    from labkit.measure.bench import DEFAULT_METHODS, check_method, default_methods, format_table, run_bench
    from labkit.model.target import load_target
    params = _params(args)
    prompts = _load_prompts(args)
    # another model than a packaged target has no shipped drafters: the training-free methods only
    packaged = args.target is None or _target_name(args.target) is not None
    methods = args.methods or (default_methods(_target_name(args.target)) if packaged else DEFAULT_METHODS)
    for name in methods:
        check_method(name)
    target = load_target(args.target, args.device, args.dtype)
    result = run_bench(target, prompts, methods, args.max_new_tokens, params,
                       args.seed, args.hf_lookup_tokens, args.gamma)
    print(format_table(result))
    if args.json_out:
        _write_json(result, args.json_out)


def cmd_eval(args) -> None:
    from labkit.measure.bench import format_eval, run_eval
    from labkit.drafters import check_spec
    from labkit.model.target import load_target
    params = _params(args)
    if args.drafter in (None, "none"):
        raise LabkitError("eval measures a drafter: pass --drafter prompt-lookup, layer-skip, dflash or a checkpoint.")
    check_spec(args.drafter)
    prompts = _load_prompts(args)
    target = load_target(args.target, args.device, args.dtype)
    result = run_eval(target, prompts, args.drafter, args.max_new_tokens, params, args.seed, args.gamma, args.vs_hf)
    print(format_eval(result))
    if args.json_out:
        _write_json(result, args.json_out)


def cmd_table1(args) -> None:
    from labkit.drafters import check_spec
    from labkit.lab.plots import markdown_table
    from labkit.lab.table1_views import table1_rows, table1_sentences
    from labkit.measure.table1 import measure_table1, table1_prompts
    from labkit.model.target import load_target
    for spec in args.drafters:
        check_spec(spec)
    prompts, about = table1_prompts(args.benchmarks, args.limit)
    print(about, file=sys.stderr)
    target = load_target(args.target, args.device, args.dtype)
    result = measure_table1(target, prompts, args.drafters, args.temperatures, args.max_new_tokens, args.seed)
    if args.json_out:  # first: the measurement outlives any failure to print it
        _write_json(result, args.json_out)
    for temp in result["temperatures"]:
        header, rows = table1_rows(result, temp)
        print(f"T = {temp:g}\n{markdown_table(rows, header).data}")
        for line in table1_sentences(result, temp):
            print(line)


def cmd_calibrate(args) -> None:
    from labkit.pipeline.calibrate import calibrate_checkpoint, format_calibration
    from labkit.drafters import check_spec, checkpoint_path
    from labkit.model.target import load_target
    check_spec(args.drafter)
    if args.temperature != 0.0:
        raise LabkitError("calibrate fits one temperature set per sampling temperature given by --temperatures "
                          "(e.g. --temperatures 0 1); --temperature is not used here.")
    if any(t < 0 or t != t for t in args.temperatures):
        raise LabkitError(f"--temperatures must be 0 (greedy) or positive, got {args.temperatures}.")
    path = checkpoint_path(args.drafter, "calibrate", _target_name(args.target))
    target = load_target(args.target, args.device, args.dtype)
    report = calibrate_checkpoint(target, path, args.data, args.n_prompts, tuple(args.temperatures),
                                  args.max_new_tokens, args.seed, write=not args.dry_run)
    print(format_calibration(report))
    print(("left unchanged: " if args.dry_run else "temperatures written to ") + str(path / "config.json"))
    if args.json_out:
        _write_json(report, args.json_out)


def cmd_export(args) -> None:
    from labkit.drafters import checkpoint_path
    from labkit.drafters.export import engine_lines, export_checkpoint
    out = export_checkpoint(checkpoint_path(args.drafter, "export", _target_name(args.target)), args.target,
                            args.out, args.format)
    print(f"wrote {out} ({args.format}); what it is and how to serve it: {out / 'README.md'}")
    for line in engine_lines(out):
        print(f"  {line}")


def train_job(args: argparse.Namespace) -> "TrainJob":  # noqa: F821 (imported lazily)
    """The TrainJob of a parsed `train` command line (its options are the job's fields, by name)."""
    from dataclasses import fields

    from labkit.pipeline.train import TrainJob
    return TrainJob(**{f.name: getattr(args, f.name) for f in fields(TrainJob)})


def train_overrides(flags: list[str]) -> dict:
    """The TrainJob fields that some `train` options set, and only those, e.g. ["--layers", "1"] ->
    {"layers": 1} (scripts/recipe_ab.py's --extra); a bad option raises LabkitError."""
    p = _Parser(prog="labkit train")
    _add_train_args(p)
    for action in p._actions:
        action.default, action.required = argparse.SUPPRESS, False
    try:
        given = vars(p.parse_args(flags))
    except SystemExit:  # argparse already printed its one line
        raise LabkitError(f"Not options of `python -m labkit train`: {shlex.join(flags)}.") from None
    return given


def cmd_train(args) -> None:
    from labkit.pipeline.train import run_training
    job = train_job(args)  # before loading anything, so that a bad option fails at once
    path = run_training(job, command=shlex.join(["python", "-m", "labkit", *args.argv]))
    print(f"drafter checkpoint in {path}")


def data_config(args: argparse.Namespace) -> "DataConfig":  # noqa: F821 (imported lazily)
    """The DataConfig of a `prepare-data` command line (its defaults keep data/train's settings)."""
    from labkit.pipeline.data import DataConfig
    return DataConfig(n_prompts=args.n_prompts, max_new_tokens=args.max_new_tokens, shard_size=args.shard_size,
                      seed=args.seed, prompts=args.prompts, greedy_share=args.greedy_share,
                      template_share=args.template_share, batch_size=args.batch_size)


def cmd_prepare_data(args) -> None:
    from labkit.pipeline.data import prepare_data
    from labkit.pipeline.prompt_sets import prompt_set
    from labkit.model.target import load_target
    cfg = data_config(args)  # before loading the target, so that a bad option fails at once
    public = prompt_set(args.benchmarks).folder  # None: the lab's own set, which is always checked
    target = load_target(args.target, args.device, args.dtype)
    out = prepare_data(target, args.out, cfg, public)
    print(f"training data in {out}")


def cmd_round_cost(args) -> None:
    import torch

    from labkit.measure.costs import round_costs
    from labkit.model.target import load_target
    kernels = {"stock": (False, False), "packed": (True, False), "packed+grouped": (True, True)}
    variants = {f"{dt} {name}": load_target(args.target, dtype=dt, packed=pk, grouped=gq)
                for dt in args.dtypes for name, (pk, gq) in kernels.items()}
    some = next(iter(variants.values()))
    prompt = some.encode_prompt("Write a Python function that returns the n-th Fibonacci number, with a docstring.")
    rows = round_costs(variants, args.ks, args.drafters, prompt, context_len=args.context, repeats=args.repeats)
    shown = [k for k in (2, 4, 8, 9, 16) if k in rows[0].verify_ms]
    head = ["variant", "T_step"] + [f"T_v({k})" for k in shown] + [f"T_d({d})" for d in args.drafters]
    head += [f"v(9)/step"] + [f"b/e tau {d}" for d in args.drafters if 9 in rows[0].verify_ms]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.context}-token context, "
          f"ms (medians of {args.repeats})")
    first = max(len(r.label) for r in rows)
    print(f"{head[0]:<{first}}  " + "  ".join(f"{h:>14}" for h in head[1:]))
    for r in rows:
        cells = [r.label, f"{r.step_ms:.1f}"] + [f"{r.verify_ms[k]:.1f}" for k in shown]
        cells += [f"{r.draft_ms[d]:.1f}" for d in args.drafters]
        if 9 in r.verify_ms:
            cells += [f"{r.verify_ms[9] / r.step_ms:.2f}"] + [f"{r.break_even_tau(d, 9):.2f}" for d in args.drafters]
        print(f"{cells[0]:<{first}}  " + "  ".join(f"{c:>14}" for c in cells[1:]))
    if args.json_out:
        _write_json({"threads": torch.get_num_threads(), "repeats": args.repeats, "context": args.context,
                     "rows": [r.to_dict() for r in rows]}, args.json_out)


def cmd_notebooks(args) -> None:
    from labkit.lab.notebooks import find_notebooks, run_notebooks
    runs = run_notebooks(find_notebooks(Path(args.dir), args.names), Path(args.out), args.quick, args.timeout)
    failed = [r.notebook.name for r in runs if not r.ok]
    if failed:
        raise LabkitError(f"{len(failed)} of {len(runs)} notebooks failed ({', '.join(failed)}): the executed copies "
                          f"in {args.out} show the failing cell.")
    print(f"labkit: executed notebooks and offline HTML copies are in {args.out}/")


def cmd_serve(args) -> None:
    from tqdm.auto import tqdm

    from labkit.drafters import check_spec, make_drafter
    from labkit.pipeline.prompt_sets import describe_prompts
    from labkit.decode.engine import Engine, closed_loop, cost_table_for, make_requests, open_loop, report
    from labkit.model.target import load_target
    from labkit.core.scheduler import make_policy
    params = _params(args)
    if args.duration is not None and args.duration <= 0:
        raise LabkitError(f"--duration must be a positive number of seconds, got {args.duration}.")
    make_policy(args.policy)  # a bad policy is refused before anything loads
    check_spec(args.drafter)
    prompts = _load_prompts(args)
    target = load_target(args.target, args.device, args.dtype)
    drafter = make_drafter(args.drafter, target, args.gamma)
    table = cost_table_for(target, args.table, args.reprofile)
    requests = make_requests(target, prompts, args.max_new_tokens, params, args.seed)
    stream = (lambda rid, toks: print(f"[{rid}] {target.decode(toks)!r}", flush=True)) if args.stream else None
    engine = Engine(target, drafter, args.policy, table, on_tokens=stream)
    total = args.requests or len(requests)
    steps = (open_loop(requests, args.rate, args.users, engine, args.requests, args.duration, args.seed)
             if args.rate is not None else closed_loop(requests, args.users, engine, args.requests, args.duration))
    with tqdm(total=total, desc=f"serve {args.policy} x{args.users}", unit="req", file=sys.stderr) as bar:
        for _ in steps:
            bar.update(len(engine.done) - bar.n)
        bar.update(len(engine.done) - bar.n)
    out = {**report(engine, args.users, args.drafter), "prompt_set": describe_prompts(prompts)}
    failed = [r for r in out["requests"] if "error" in r]
    print(f"{out['policy']} x{out['users']} on {out['device']}: {out['aggregate_tokens_per_s'] or 0:.1f} tokens/s "
          f"aggregate, {out['per_user_tokens_per_s'] or 0:.1f} per user, verify budget "
          f"{out['mean_verify_budget'] or 0:.2f} tokens/request/step, tau {out['tau'] or 0:.2f}, "
          f"{len(out['requests']) - len(failed)} requests served" + (f", {len(failed)} refused" if failed else ""))
    for r in failed:
        print(f"  request {r['id']}: {r['error']}", file=sys.stderr)
    if args.json_out:
        _write_json(out, args.json_out)


def cmd_serve_sweep(args) -> None:
    from labkit.drafters import check_spec, make_drafter
    from labkit.pipeline.prompt_sets import describe_prompts
    from labkit.core.scheduler import make_policy
    from labkit.decode.engine import COST_MODELS, cost_table_for
    from labkit.measure.sweeps import (BEST_FIXED, WINDOW, against_best_fixed, arm_cost_model,
                                       format_against_best_fixed, format_gain, format_sweep, is_fixed, matched_gain,
                                       prompt_mix, run_sweeps, split_arm, summarize)
    from labkit.model.target import load_target
    check_spec(args.drafter)
    arm_specs = []
    for name in args.policies:
        policy, spec = split_arm(arm_cost_model(name)[0])
        make_policy(policy)
        if spec is not None:
            check_spec(spec)
            arm_specs.append(spec)
    if args.cost_model not in COST_MODELS:
        raise LabkitError(f"Unknown --cost-model {args.cost_model!r}: choose one of {', '.join(COST_MODELS)}.")
    if args.baseline not in args.policies:
        raise LabkitError(f"--baseline {args.baseline} is not among --policies {' '.join(args.policies)}: add it "
                          "or name one of them.")
    prompts = _load_prompts(args)
    mix = prompt_mix(prompts, args.requests_per_user)
    print(f"prompt mix: {len(mix)} requests per user at every load, from {len(prompts)} prompts"
          + (f" ({', '.join(getattr(p, 'domain', '?') for p in mix)})" if hasattr(mix[0], "domain") else ""),
          file=sys.stderr)
    target = load_target(args.target, args.device, args.dtype)
    drafter = make_drafter(args.drafter, target, args.gamma)
    arm_drafters = {spec: make_drafter(spec, target) for spec in dict.fromkeys(arm_specs)}
    table = cost_table_for(target, args.table, args.reprofile)
    step_table = None
    if "steps" in {arm_cost_model(name)[1] or args.cost_model for name in args.policies}:
        from labkit.measure.step_profile import step_table_for
        if drafter is None:
            raise LabkitError("the cost model 'steps' times the engine's steps with a drafter: pass --drafter.")
        step_table = step_table_for(target, drafter, args.drafter, args.table, args.reprofile)
    by_temperature = run_sweeps(target, drafter, prompts, args.users, args.policies, table, args.temperatures,
                                args.max_new_tokens, args.requests_per_user, args.seed, args.drafter, progress=True,
                                top_p=args.top_p, repeats=args.repeats, cost_model=args.cost_model,
                                recalibrate=args.recalibrate, arm_drafters=arm_drafters, step_table=step_table)
    reports = [rep for reps in by_temperature.values() for rep in reps]
    print(format_sweep(reports))
    gains = {}
    for temp, reps in by_temperature.items():
        gains[str(float(temp))] = {p: matched_gain(reps, p, args.baseline) for p in args.policies if p != args.baseline}
        for gain in gains[str(float(temp))].values():
            print(f"T={float(temp):g}: {format_gain(gain)}")
        for policy in (p for p in args.policies if not is_fixed(p)):
            for choose in BEST_FIXED:
                rows = against_best_fixed(reps, policy, choose=choose)
                print(f"T={float(temp):g}: {format_against_best_fixed(rows, policy)}")
    if args.json_out:
        _write_json({"table": table.to_dict(), "step_table": step_table.to_dict() if step_table else None,
                     "window": WINDOW, "repeats": args.repeats,
                     "requests_per_user": args.requests_per_user, "baseline": args.baseline,
                     "prompt_mix": [getattr(p, "text", p) for p in mix],
                     "cells": summarize(reports), "matched_gains": gains, "reports": reports,
                     "prompt_set": describe_prompts(prompts)}, args.json_out)


def _simulation_cost(args, traces):
    """--table: this CPU's costs from the trace file, a roofline GPU, or a JSON file."""
    from labkit.core.scheduler import CostTable
    from labkit.core.simulate import GPUS, SimCost, roofline_cost
    if args.table == "cpu":
        if traces.cpu_cost is None:
            raise LabkitError(f"{args.traces} holds no CPU costs: record it again without --no-costs, or pass "
                              "--table h100.")
        return traces.cpu_cost
    if args.table in GPUS:
        return roofline_cost(args.table, args.model, args.context)
    path = Path(args.table)
    if not path.is_file():
        raise LabkitError(f"--table {args.table} is neither cpu, {', '.join(GPUS)} nor a JSON file: pass one of them.")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise LabkitError(f"--table {path} is not JSON ({exc}).") from None
    if isinstance(data, dict) and isinstance(data.get("tables"), list) and len(data["tables"]) == 1:
        data = data["tables"][0]  # a cost_tables.json holding one table
    if isinstance(data, dict) and "batch_sizes" in data:
        return SimCost(CostTable.from_dict(data), label=f"the cost table in {path} (no drafting cost)")
    if isinstance(data, dict) and "table" in data:
        return SimCost.from_dict(data)
    raise LabkitError(f"--table {path} holds neither a cost table nor a simulation cost: pass a file with "
                      "'batch_sizes' and 'raw_sps', or one with 'table' and 'draft'.")


def cmd_record_traces(args) -> None:
    from labkit.drafters import check_spec, make_drafter
    from labkit.measure.traces import add_cpu_costs, record_traces, save_traces
    from labkit.model.target import load_target
    from labkit.pipeline.prompt_sets import describe_prompts
    if any(t < 0 for t in args.temperatures):
        raise LabkitError(f"--temperatures must be 0 (greedy) or positive, got {args.temperatures}.")
    check_spec(args.drafter)
    if args.mtp1_drafter != "first":
        check_spec(args.mtp1_drafter)
    prompts = _load_prompts(args)
    target = load_target(args.target, args.device, args.dtype)
    drafter = make_drafter(args.drafter, target, args.gamma)
    one = None if args.mtp1_drafter == "first" else make_drafter(args.mtp1_drafter, target, 1)
    meta = {"drafter": args.drafter, "mtp1_drafter": args.mtp1_drafter,
            "command": "python -m labkit " + shlex.join(args.argv), "prompt_set": describe_prompts(prompts)}
    traces = record_traces(target, drafter, prompts, args.max_new_tokens, args.temperatures, seed=args.seed,
                           progress=True, meta=meta, one_drafter=one)
    save_traces(traces, args.out)  # the traces are kept even if measuring the costs fails
    if args.costs:
        add_cpu_costs(traces, target, drafter, progress=True, one_drafter=one)
        save_traces(traces, args.out)
    for s in traces.sets:
        rounds = [r for q in s.requests for r in q.rounds]
        tau = sum(r.accept_len + 1 for r in rounds) / len(rounds)
        print(f"{s.source} T={s.temperature:g}: {len(s.requests)} requests, {len(rounds)} rounds, tau {tau:.2f}")
    print(f"wrote {args.out}", file=sys.stderr)


def cmd_simulate(args) -> None:
    from tqdm.auto import tqdm

    from labkit.core.scheduler import make_policy
    from labkit.core.simulate import GPUS, MODEL_SIZES, sweep
    from labkit.measure.traces import DEFAULT_TRACES, format_validation, load_traces
    for name in args.policies:
        make_policy(name)
    if args.model not in MODEL_SIZES:
        raise LabkitError(f"--model {args.model} is not a model size of the roofline model: choose one of "
                          f"{', '.join(MODEL_SIZES)}.")
    if args.validate and args.table != "cpu":
        raise LabkitError("--validate runs the engine on this CPU, so it needs --table cpu.")
    if args.table not in ("cpu", *GPUS) and not Path(args.table).is_file():
        raise LabkitError(f"--table {args.table} is neither cpu, {', '.join(GPUS)} nor a JSON file: pass one of them.")
    args.traces = args.traces or str(DEFAULT_TRACES)
    traces = load_traces(args.traces)
    temps = args.temperatures if args.temperatures is not None else traces.temperatures
    missing = [t for t in temps if traces.get("block", t) is None]
    if missing:
        raise LabkitError(f"{args.traces} has no traces at temperature {missing[0]:g}: it holds "
                          f"{', '.join(f'{t:g}' for t in traces.temperatures)}.")
    cost = _simulation_cost(args, traces)
    m = traces.meta
    print(f"traces: {args.traces} ({m.get('target', '?')} + {m.get('drafter', '?')}, recorded {m.get('recorded', '?')}; "
          f"prompts by domain {(m.get('prompt_set') or {}).get('domains', '?')})", file=sys.stderr)
    print(f"costs: {cost.label or cost.table.device}", file=sys.stderr)
    results = []
    with tqdm(total=len(temps) * len(args.users) * len(args.policies), desc="simulate", unit="run",
              file=sys.stderr) as bar:
        for temp in temps:
            one = traces.get("mtp1", temp)
            sources = {"mtp1": one.requests} if one is not None and "mtp1" in args.policies else {}
            for res in sweep(traces.get("block", temp).requests, args.users, args.policies, cost, sources,
                             args.requests_per_user, args.seed, on_run=lambda r: bar.update(1)):
                results.append({"temperature": temp, **res})
    if args.table in GPUS:  # the roofline model knows no memory limit: say where the KV caches would not fit
        from labkit.core.simulate import roofline_fits
        for r in results:
            r["fits_in_memory"] = roofline_fits(args.table, args.model, r["users"], args.context)
        over = sorted({r["users"] for r in results if not r["fits_in_memory"]})
        if over:
            print(f"note: at {', '.join(map(str, over))} users the weights and KV caches exceed the "
                  f"{args.table}'s memory (the model does not limit it)", file=sys.stderr)
    print(f"{'T':>4} {'policy':<12}{'users':>6} {'tokens/s':>12} {'per user':>10} {'budget':>8} {'tau':>6} {'B':>8}")
    for r in results:
        print(f"{r['temperature']:>4g} {r['policy']:<12}{r['users']:>6} {r['aggregate_tokens_per_s']:>12.1f} "
              f"{r['per_user_tokens_per_s'] or 0:>10.2f} {r['mean_verify_budget']:>8.2f} {r['tau']:>6.2f} "
              f"{r['mean_batch_tokens']:>8.1f}")
    out = {"costs": cost.to_dict(), "traces": args.traces, "trace_meta": traces.meta, "results": results,
           "approximation": "the next round's confidences come from the trace, not from a context that depends "
                            "on the verified length (labkit/core/simulate.py)"}
    if args.validate:
        from labkit.drafters import make_drafter
        from labkit.measure.traces import validate
        from labkit.model.target import load_target
        target = load_target()
        drafter = make_drafter(traces.meta.get("drafter", "dspark"), target)
        one_spec = traces.meta.get("mtp1_drafter", "first")  # files recorded before it: the first position
        one = None if one_spec == "first" else make_drafter(one_spec, target, 1)
        rows = []
        for temp in temps:
            rows += validate(target, drafter, traces, args.users, args.policies, temp, args.requests_per_user,
                             traces.meta.get("drafter", "dspark"), progress=True, one_drafter=one)
        print(format_validation(rows))
        out["validation"] = rows
    if args.figures:
        from labkit.lab.simulation_views import write_figures
        for path in write_figures(results, args.figures, cost.label or cost.table.device):
            print(f"wrote {path}", file=sys.stderr)
    if args.json_out:
        _write_json(out, args.json_out)


def cmd_benchmarks(args) -> None:
    from labkit.pipeline.benchmark_fetch import DEFAULT_OUT, DEFAULT_SETS, fetch_benchmarks
    out = Path(args.out) if args.out else DEFAULT_OUT
    counts = fetch_benchmarks(out, args.sets or DEFAULT_SETS, args.endpoint)
    for name, n in counts.items():
        print(f"{out / (name + '.jsonl')}: {n} prompts")
    if out.resolve() != DEFAULT_OUT.resolve():
        print(f"labkit: measure them with --benchmarks {out} or LABKIT_BENCHMARKS={out}", file=sys.stderr)


COMMANDS = {"setup": cmd_setup, "generate": cmd_generate, "bench": cmd_bench, "prepare-data": cmd_prepare_data,
            "train": cmd_train, "eval": cmd_eval, "calibrate": cmd_calibrate, "export": cmd_export,
            "notebooks": cmd_notebooks, "round-cost": cmd_round_cost, "serve": cmd_serve,
            "serve-sweep": cmd_serve_sweep, "benchmarks": cmd_benchmarks,
            "record-traces": cmd_record_traces, "simulate": cmd_simulate, "table1": cmd_table1}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one line
        return int(exc.code or 0)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a command records of how it was run
    try:
        COMMANDS[args.command](args)
    except LabkitError as exc:
        print(f"labkit: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("labkit: interrupted.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
