"""labkit: the Speculative Decoding Lab's package (DSpark, rebuilt from scratch and measured).

Data flows one way: target -> drafter proposals -> chain verification -> decoding traces -> benchmarks.
"""

from labkit.decode.loop import DecodeState, GenerationResult, generate, prefill, speculative_round
from labkit.drafters import make_drafter
from labkit.core.errors import LabkitError
from labkit.core.sampling import SamplingParams, logits_to_probs, verify_chain
from labkit.model.target import DEFAULT_TARGET, Target, load_target
from labkit.core.trace import Round

__all__ = ["DEFAULT_TARGET", "DecodeState", "GenerationResult", "LabkitError", "Round", "SamplingParams",
           "Target", "generate", "load_target", "logits_to_probs", "make_drafter", "prefill",
           "speculative_round", "verify_chain"]
