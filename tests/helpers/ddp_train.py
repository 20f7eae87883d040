"""Run under `accelerate launch --cpu --num_processes N`: one `labkit train` job (argv after the script
name, as the command line takes it), then record what this rank did for tests/test_ddp.py: its final
parameters (rank<i>.safetensors) and every checkpoint or metrics write it made (rank<i>.writes.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

import labkit.pipeline.train as train_module
from labkit.__main__ import main

state = PartialState(cpu=train_module.several_cpu_processes())  # as the trainer makes it (the first one counts)
writes: list[str] = []
for name in ("save_training_state", "_append_jsonl"):
    real = getattr(train_module, name)

    def spy(*args, _real=real, _name=name, **kw):
        writes.append(_name)
        return _real(*args, **kw)
    setattr(train_module, name, spy)

captured = {}
real_train = train_module.train


def keep_model(model, *args, **kw):
    captured["model"] = model
    return real_train(model, *args, **kw)


train_module.train = keep_model
rc = main(sys.argv[1:])
out = Path(sys.argv[sys.argv.index("--out") + 1])
params = {k: v.detach().cpu().contiguous() for k, v in captured["model"].state_dict().items()}
save_file(params, str(out / f"rank{state.process_index}.safetensors"))
(out / f"rank{state.process_index}.writes.json").write_text(json.dumps({"rc": rc, "writes": writes}))
