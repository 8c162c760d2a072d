"""Megatron checkpoints of the shared tiny SFT model at every layout the training tests use."""

import pytest

from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
from megatron.sft.runtime.layout import ParallelLayout

LAYOUTS = {(1, 1): ParallelLayout(1, 1), (2, 1): ParallelLayout(2, 1),
           (1, 2): ParallelLayout(1, 2), (2, 2): ParallelLayout(2, 2),
           "vpp": ParallelLayout(1, 2, 2)}


@pytest.fixture(scope="session")
def checkpoints(sft_assets, tmp_path_factory):
    """``{(tp, pp) or "vpp": checkpoint dir}``, converted once per test process (a test that
    trains from one writes its run elsewhere, so they are shared read-only)."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for key, layout in LAYOUTS.items():
        name = "tp1pp2vpp2" if key == "vpp" else f"tp{key[0]}pp{key[1]}"
        out[key] = str(root / name)
        convert_hf_to_megatron(sft_assets["hf"], out[key],
                               ConvertOptions(layout=layout, progress=False))
    return out

