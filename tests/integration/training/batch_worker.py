"""torchrun worker that runs many training scenarios, one after another, in one process group.

Starting processes (Python, torch, megatron-core, transformers on every rank) is most of what a
training test costs on a 2-core CI machine; the scenarios themselves take a second or two. So
every scenario of a test module that needs the same number of ranks shares one launch.

``batch_worker.py SPEC.json``: SPEC holds ``scenarios``, each a ``train_worker`` or
``lora_worker`` spec (``kind``: ``train`` | ``lora``) with a ``name``, its ``out`` file and
optional ``before`` actions (``{"set_latest": [DIR, ITERATION]}``: point a checkpoint's tracker
back at an earlier save, as a user rolling back does; the value found is recorded next to
``out`` as ``<out>.latest_before``). Between scenarios megatron-core's parallel state and the
tensor-parallel RNG are rebuilt from scratch, so each scenario starts as a fresh launch would
(its own layout, its seed). A scenario that fails writes ``{"error": traceback}`` to its
``out`` and the next one runs.
"""

import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lora_worker  # noqa: E402
import train_worker  # noqa: E402

WORKERS = {"train": train_worker.run, "lora": lora_worker.run}


def _fresh_parallel_state() -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from megatron.sft.runtime.distributed import release_model_parallel

    release_model_parallel()  # closes the gloo groups and forgets the parallel dims too
    get_cuda_rng_tracker().reset()


def _before(actions: list, out: Path) -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return
    for action in actions:
        directory, iteration = action["set_latest"]
        tracker = Path(directory) / "latest_checkpointed_iteration.txt"
        Path(str(out) + ".latest_before").write_text(tracker.read_text().strip())
        tracker.write_text(f"{iteration}\n")
    if dist.is_initialized():
        dist.barrier()


def main() -> None:
    import gc

    import torch.distributed as dist

    spec = json.loads(Path(sys.argv[1]).read_text())
    for scenario in spec["scenarios"]:
        out = Path(scenario["out"])
        if scenario.get("before"):
            _before(scenario["before"], out)
        try:
            WORKERS[scenario["kind"]](scenario)
        except Exception:
            out.write_text(json.dumps({"error": traceback.format_exc()}))
        _fresh_parallel_state()
        gc.collect()
        if dist.is_initialized():
            dist.barrier()
    from megatron.sft.runtime.distributed import destroy_distributed

    destroy_distributed(wait_for_peers=True)


if __name__ == "__main__":
    main()
