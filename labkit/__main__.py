"""Command line: `python -m labkit {setup,generate,bench} ...`; later issues add train, eval, serve.

Every bad input exits non-zero with one line on stderr that names the fix, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from labkit.errors import LabkitError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        self.exit(2, f"labkit: {message} (see `python -m labkit {self.prog.split()[-1]} --help`)\n")


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="labkit", description="The Speculative Decoding Lab.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("setup", help="convert the default target once so that later loads take < 1 s")
    p.add_argument("--target", default=None, help="model to prepare (default: the default target)")

    p = sub.add_parser("generate", help="generate text for one prompt, with or without a drafter")
    p.add_argument("--prompt", required=True, help="the user's message (goes through the chat template)")
    p.add_argument("--drafter", default="none", help="none, prompt-lookup, layer-skip[:N] (default: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    _add_model_args(p)

    p = sub.add_parser("bench", help="tokens/s of HF generate, HF prompt lookup, the lab's AR and speculative loops")
    p.add_argument("--prompts", nargs="+", required=True, help='JSONL files of {"turns": [...]} rows')
    p.add_argument("--limit", type=_positive_int, default=None, help="prompts taken from each file")
    p.add_argument("--methods", nargs="+", default=None,
                   help="hf-generate hf-prompt-lookup ar spec:prompt-lookup spec:layer-skip (default: all)")
    p.add_argument("--hf-lookup-tokens", type=_positive_int, default=3, help="HF's prompt_lookup_num_tokens")
    p.add_argument("--json", dest="json_out", default=None, help="write the result JSON here")
    _add_model_args(p)
    p = sub.add_parser("prepare-data", help="regenerate training responses with the target (resumable)")
    p.add_argument("--out", default="data/train", help="folder of shards (default: data/train)")
    p.add_argument("--target", default=None, help="HF causal LM id or local path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--n-prompts", type=_positive_int, default=2048, help="training prompts to answer")
    p.add_argument("--max-new-tokens", type=_positive_int, default=256, help="longest response")
    p.add_argument("--shard-size", type=_positive_int, default=64, help="prompts per shard and batch")
    p.add_argument("--seed", type=int, default=0, help="prompt and sampling seed")
    p.add_argument("--benchmarks", default="../shared/benchmarks",
                   help="evaluation prompts that training prompts must not overlap (skipped if absent)")
    return parser


def _params(args):
    from labkit.sampling import SamplingParams
    return SamplingParams(temperature=args.temperature, top_p=args.top_p)


def cmd_setup(args) -> None:
    from labkit.target import load_target
    target = load_target(args.target)
    print(f"{target.name} ready on {target.device}: {target.num_layers} layers, vocabulary {target.vocab_size}.")


def cmd_generate(args) -> None:
    from labkit.decoding import generate
    from labkit.drafters import check_spec, make_drafter
    from labkit.target import load_target
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


def cmd_bench(args) -> None:
    from labkit.bench import DEFAULT_METHODS, check_method, format_table, load_prompts, run_bench
    from labkit.target import load_target
    params = _params(args)
    prompts = load_prompts(args.prompts, args.limit)
    for name in args.methods or DEFAULT_METHODS:
        check_method(name)
    target = load_target(args.target, args.device, args.dtype)
    result = run_bench(target, prompts, args.methods or DEFAULT_METHODS, args.max_new_tokens, params,
                       args.seed, args.hf_lookup_tokens, args.gamma)
    print(format_table(result))
    if args.json_out:
        path = Path(args.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, path)
        print(f"wrote {path}", file=sys.stderr)


def cmd_prepare_data(args) -> None:
    from labkit.data import DataConfig, prepare_data
    from labkit.target import load_target
    target = load_target(args.target, args.device)
    cfg = DataConfig(n_prompts=args.n_prompts, max_new_tokens=args.max_new_tokens, shard_size=args.shard_size,
                     seed=args.seed)
    out = prepare_data(target, args.out, cfg, args.benchmarks)
    print(f"training data in {out}")


COMMANDS = {"setup": cmd_setup, "generate": cmd_generate, "bench": cmd_bench, "prepare-data": cmd_prepare_data}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one line
        return int(exc.code or 0)
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
