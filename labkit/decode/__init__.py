"""Decoding: one request's speculative rounds (`loop`), the batched multi-request engine (`engine`) and
batched sampling for training data (`batch_generate`). Drafters are used through their protocol only;
nothing here imports the trainer or the notebook views."""
