"""The GPU proof's command line (one parser for the orchestrator and its child steps)."""

from __future__ import annotations

import argparse

from gpu_proof_parts.settings import REPO, TOTAL_BUDGET


# ------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda: the real proof; cpu: a dry run (GPU-only steps are skipped)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny models, 40 conversations, sequence 256, 2+2 iterations: checks "
                        "the harness, measures nothing")
    p.add_argument("--out", default=str(REPO / "runs" / "gpu_proof"),
                   help="results (results.json, the steps' logs, trace.json.gz) are written "
                        "here as they come; keep it small: big files go to --workdir")
    p.add_argument("--workdir", default=None,
                   help="models, data and checkpoints (~50 GB on CUDA; default: on CUDA the "
                        "roomier of /dev/shm and /tmp, on CPU OUT/work)")
    p.add_argument("--wheels", default=None,
                   help="folder of .whl files to install first (pip --no-index --no-deps "
                        "--target WORKDIR/site, put on PYTHONPATH), e.g. the .whl/ that "
                        "benchmarks/gpu_proof_wheels.sh fills")
    p.add_argument("--site-pth", action="store_true",
                   help="also write a .pth file naming the --wheels target into this "
                        "interpreter's site-packages, so subprocesses that reset PYTHONPATH "
                        "(some test helpers do) find the wheels too: for a throwaway machine")
    p.add_argument("--budget", type=float, default=TOTAL_BUDGET,
                   help=f"seconds for the whole run (default {TOTAL_BUDGET}); every step's "
                        "budget scales with it, and a step passes its unused seconds on")
    p.add_argument("--trace", action="store_true",
                   help="also write the profile's Chrome trace to OUT/trace.json.gz (when it "
                        "fits 15 MB and the throughput budget)")
    p.add_argument("--gpu-test-workers", type=int, default=4,
                   help="pytest-xdist workers for the GPU tests (default 4; 1 = no xdist)")
    p.add_argument("--run-step", choices=["prep", "throughput", "forward"],
                   default=None,
                   help="internal: run one part in this process (the orchestrator starts "
                        "itself with it, so that every step can be stopped at its budget)")
    p.add_argument("--deadline", type=float, default=None,
                   help="internal: wall-clock time (time.time()) the --run-step must end by")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)
