"""Bad input fails early with a LabkitError whose sentence names the fix; on the command line it exits
non-zero with exactly one line on stderr and no traceback."""

from __future__ import annotations

import json

import pytest

from labkit.__main__ import main
from labkit.measure.bench import run_bench
from labkit.pipeline.prompt_sets import Prompt, load_prompts
from labkit.decode.loop import generate, prefill
from labkit.drafters import LayerSkipConfig, LayerSkipDrafter, PromptLookupConfig, PromptLookupDrafter, make_drafter
from labkit.drafters.base import Drafter, Proposal
from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams
from labkit.model.target import DEFAULT_TARGET, load_target, parse_dtype

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 12


@pytest.fixture(scope="module")
def target(make_tiny_target):
    return make_tiny_target(VOCAB, n_layers=3, name="tiny-target")


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) as `python -m labkit` would exit: its return value, or argparse's SystemExit code."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *fragments):
    assert rc not in (0, None), f"exit code {rc}"
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {err!r}"
    assert lines[0].startswith("labkit: ")
    for fragment in fragments:
        assert fragment in lines[0]


# ----------------------------------------------------------------------------------------------------
# empty prompt


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_encode_prompt_rejects_empty_text(target, text):
    with pytest.raises(LabkitError, match="prompt is empty"):
        target.encode_prompt(text)


def test_prefill_and_generate_reject_empty_prompt_ids(target):
    with pytest.raises(LabkitError, match="prompt is empty"):
        prefill(target, [], 4, SamplingParams())
    with pytest.raises(LabkitError, match="prompt is empty"):
        generate(target, [], max_new_tokens=4)


@pytest.mark.parametrize("text", ["", "   "])
def test_cli_generate_rejects_empty_prompt(capsys, text):
    rc, out, err = run_cli(["generate", "--prompt", text], capsys)
    assert_one_line_error(rc, err, "prompt is empty")
    assert out == ""


# ----------------------------------------------------------------------------------------------------
# max_new_tokens, temperature, top-p


@pytest.mark.parametrize("max_new", [0, -3, 2.5, None])
def test_generate_rejects_non_positive_max_new_tokens(target, max_new):
    with pytest.raises(LabkitError, match="max_new_tokens must be a positive integer"):
        generate(target, [1, 2, 3], max_new_tokens=max_new)


@pytest.mark.parametrize("value", ["0", "-1", "ten"])
def test_cli_rejects_non_positive_max_new_tokens(capsys, value):
    rc, out, err = run_cli(["generate", "--prompt", "hi", "--max-new-tokens", value], capsys)
    assert_one_line_error(rc, err, "--max-new-tokens", "positive integer")


@pytest.mark.parametrize("value", ["-0.5", "nan"])
def test_cli_rejects_bad_temperature(capsys, value):
    rc, out, err = run_cli(["generate", "--prompt", "hi", "--temperature", value], capsys)
    assert_one_line_error(rc, err, "temperature must be >= 0")


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_cli_rejects_top_p_outside_zero_one(capsys, value):
    rc, out, err = run_cli(["generate", "--prompt", "hi", "--temperature", "1", "--top-p", value], capsys)
    assert_one_line_error(rc, err, "top-p must lie in (0, 1]")


def test_library_rejects_bad_sampling_params():
    with pytest.raises(LabkitError):
        SamplingParams(temperature=-1.0)
    with pytest.raises(LabkitError):
        SamplingParams(temperature=1.0, top_p=0.0)


# ----------------------------------------------------------------------------------------------------
# unknown model, unknown dtype


def test_unknown_model_offline_names_the_default_target(monkeypatch):
    monkeypatch.delenv("LABKIT_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(LabkitError) as info:
        load_target("no-such-org/no-such-model", device="cpu")
    message = str(info.value)
    assert "no-such-org/no-such-model" in message and "not available offline" in message
    assert DEFAULT_TARGET in message


def test_local_folder_without_a_model_says_so(tmp_path):
    with pytest.raises(LabkitError, match="Could not load a causal LM from"):
        load_target(str(tmp_path), device="cpu")


def test_cli_unknown_model_offline(capsys, monkeypatch):
    monkeypatch.delenv("LABKIT_ALLOW_DOWNLOAD", raising=False)
    rc, out, err = run_cli(["generate", "--prompt", "hi", "--target", "no-such-org/no-such-model",
                            "--device", "cpu"], capsys)
    assert_one_line_error(rc, err, "not available offline", DEFAULT_TARGET)


def test_unknown_dtype():
    with pytest.raises(LabkitError, match="float32, bfloat16, float16"):
        parse_dtype("int7")


# ----------------------------------------------------------------------------------------------------
# drafter / target mismatch, unknown drafter


class WrongVocabDrafter(Drafter):
    name = "wrong-vocab-drafter"
    gamma = 1

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def start(self, state, hidden):
        pass

    def propose(self, state, max_tokens):
        return Proposal.empty(self.vocab_size)

    def observe(self, state, n_accepted, hidden):
        pass


@pytest.mark.parametrize("make", [WrongVocabDrafter, PromptLookupDrafter], ids=["custom", "prompt-lookup"])
def test_drafter_vocabulary_must_match_target(target, make):
    drafter = make(VOCAB + 5)
    for call in (lambda: prefill(target, [1, 2], 4, SamplingParams(), drafter=drafter),
                 lambda: generate(target, [1, 2], drafter, max_new_tokens=4)):
        with pytest.raises(LabkitError) as info:
            call()
        message = str(info.value)
        assert drafter.name in message and "tiny-target" in message
        assert str(VOCAB + 5) in message and str(VOCAB) in message


@pytest.mark.parametrize("spec,match", [
    ("nope", "Unknown drafter 'nope'"),
    ("eagle", "none, prompt-lookup, layer-skip"),
    ("layer-skip:two", "layer-skip takes a layer count"),
    ("layer-skip:0", "1 <= n_layers < 3"),
    ("layer-skip:3", "1 <= n_layers < 3"),
])
def test_make_drafter_rejects_unknown_or_impossible_specs(target, spec, match):
    with pytest.raises(LabkitError, match=match):
        make_drafter(spec, target)


def test_drafter_configs_reject_impossible_values(target):
    with pytest.raises(LabkitError, match="gamma"):
        LayerSkipDrafter(target, LayerSkipConfig(n_layers=1, gamma=0))
    with pytest.raises(LabkitError, match="min_ngram"):
        PromptLookupDrafter(VOCAB, PromptLookupConfig(gamma=4, max_ngram=2, min_ngram=3))
    with pytest.raises(LabkitError, match="gamma"):
        PromptLookupDrafter(VOCAB, PromptLookupConfig(gamma=0))


# ----------------------------------------------------------------------------------------------------
# the CLI after a model has loaded (uses a tiny saved checkpoint with the real tokenizer)


def test_cli_unknown_drafter_is_one_stderr_line(capsys, tiny_model_dir):
    rc, out, err = run_cli(["generate", "--prompt", "hi", "--drafter", "nope", "--target", str(tiny_model_dir),
                            "--device", "cpu"], capsys)
    assert_one_line_error(rc, err, "Unknown drafter 'nope'")


def test_cli_unknown_drafter_exits_with_the_error_and_no_traceback(capsys, tiny_model_dir):
    """What holds today: the last stderr line is the error, and no traceback is printed."""
    rc, out, err = run_cli(["generate", "--prompt", "hi", "--drafter", "nope", "--target", str(tiny_model_dir),
                            "--device", "cpu"], capsys)
    assert rc == 2 and "Traceback" not in err and out == ""
    assert err.splitlines()[-1].startswith("labkit: Unknown drafter 'nope'")


# ----------------------------------------------------------------------------------------------------
# bench inputs


def test_load_prompts_errors(tmp_path):
    with pytest.raises(LabkitError, match="does not exist"):
        load_prompts([tmp_path / "missing.jsonl"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "no turns"}) + "\n")
    with pytest.raises(LabkitError, match='"turns"'):
        load_prompts([bad])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(LabkitError, match="No prompts found"):
        load_prompts([empty])
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"turns": ["hi"]}) + "\n")
    with pytest.raises(LabkitError, match="--limit"):
        load_prompts([good], limit=0)


def test_run_bench_rejects_unknown_method_and_bad_length(target):
    prompts = [Prompt("hi", "chat", "test")]
    with pytest.raises(LabkitError, match="Unknown bench method 'fast'"):
        run_bench(target, prompts, methods=["fast"], max_new_tokens=2, progress=False)
    with pytest.raises(LabkitError, match="max_new_tokens must be positive"):
        run_bench(target, prompts, methods=["ar"], max_new_tokens=0, progress=False)


def test_run_bench_rejects_an_empty_prompt_list(target):
    with pytest.raises(LabkitError):
        run_bench(target, [], methods=["ar"], max_new_tokens=2, progress=False)


def test_cli_bench_unknown_method_exits_with_the_error_and_no_traceback(capsys, tmp_path, tiny_model_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"turns": ["hi"]}) + "\n")
    rc, out, err = run_cli(["bench", "--prompts", str(prompts), "--methods", "fast", "--target", str(tiny_model_dir),
                            "--device", "cpu"], capsys)
    assert rc == 2 and "Traceback" not in err and out == ""
    assert err.splitlines()[-1].startswith("labkit: Unknown bench method 'fast'")


def test_cli_bench_missing_prompt_file(capsys, tmp_path):
    rc, out, err = run_cli(["bench", "--prompts", str(tmp_path / "nope.jsonl")], capsys)
    assert_one_line_error(rc, err, "does not exist")


def test_cli_bench_rejects_zero_limit(capsys, tmp_path):
    rc, out, err = run_cli(["bench", "--prompts", str(tmp_path / "x.jsonl"), "--limit", "0"], capsys)
    assert_one_line_error(rc, err, "--limit")


def test_cli_unknown_command(capsys):
    rc, out, err = run_cli(["frobnicate"], capsys)
    assert_one_line_error(rc, err, "invalid choice")

