#!/usr/bin/env python3
"""torchrun for our recipes: the same arguments, but the exit code is the worker's own (75:
saved and stopped early, run again; 76: hung; 2: a user mistake), its one-line error is the
last line printed, and SIGTERM / SIGINT / SIGUSR1 reach the workers, which save before exiting
(no 30 s SIGKILL deadline). See megatron/sft/runtime/launch.py.

  python tools/launch.py --nproc-per-node 8 --nnodes 2 --node-rank 0 --master-addr node0 \
      --master-port 6000 tools/train_sft.py --load ... --save ...
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.sft.runtime.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
