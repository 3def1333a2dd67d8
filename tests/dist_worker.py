"""One rank of a data-parallel CPU training run; started by tests/test_distributed.py through torchrun.

Usage: python -m torch.distributed.run --standalone --nproc_per_node N dist_worker.py
       --output MASK_DIR --results DIR key=value [key=value ...]

Each rank writes ``DIR/rank{R}.safetensors`` (its final logits) and ``DIR/rank{R}.json`` (what it saw
of the process group and whether it wrote the artefact).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors.torch import save_file

from erasekit.config import load_config
from erasekit.methods.mask.trainer import MaskTrainer
from erasekit.pipeline import load_pipeline
from erasekit.training.run import make_accelerator, staging_path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = load_config(None, args.overrides)
    assert config.model.device == "cpu", "the worker runs on CPU"
    output = Path(args.output)
    accelerator = make_accelerator(config, staging_path(output))
    pipe = load_pipeline(config.model.id, config.model.dtype, "cpu")

    calls: list[int] = []
    write_artifact = MaskTrainer._write_artifact

    def spy(self: MaskTrainer, *a: object, **k: object) -> None:
        calls.append(accelerator.process_index)
        write_artifact(self, *a, **k)

    MaskTrainer._write_artifact = spy  # type: ignore[method-assign]
    result = MaskTrainer(pipe, config, output, accelerator).fit()

    rank = accelerator.process_index
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    save_file(result.logits, str(results / f"rank{rank}.safetensors"))
    report = {
        "rank": rank,
        "pid": os.getpid(),
        "num_processes": accelerator.num_processes,
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "distributed_type": str(accelerator.distributed_type),
        "device": str(accelerator.device),
        "is_main_process": accelerator.is_main_process,
        "wrote_artifact": bool(calls),
        "result_output": str(result.output),
    }
    (results / f"rank{rank}.json").write_text(json.dumps(report))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
