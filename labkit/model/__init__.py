"""The target side: loading a target (the default, a packaged one or any HF causal LM), its cached
forward with chosen hidden layers, pre-packed CPU kernels, grouped attention, the batched KV cache,
and timing a forward on this device. Imports core only."""
