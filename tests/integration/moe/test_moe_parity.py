"""Mixture-of-Experts logits from converted checkpoints equal transformers' (fp32, gloo): every
MoE family at EP2, TP2 x EP2 and PP2 x EP2 under the grouped_mm and the sequential experts
implementations, one family each at EP4 (one local expert per rank) and PP2 x VPP2 x EP2, both
token dispatchers; two negative controls show the check tells a wrong router setting apart.
(The cases run in the shared MoE launch, see conftest.py.)"""

import json

import pytest

ATOL = 1e-4


@pytest.mark.xdist_group("multiprocess")
def test_moe_logits_match_transformers(moe_launch):
    results = moe_launch["parity"]
    assert set(results) == {c["name"] for c in moe_launch["cases"]}
    for name, r in results.items():
        assert r["ref_abs_max"] > 0.1, f"{name}: degenerate reference logits"
        if name.startswith("control/"):
            assert r["max_abs_diff"] > 1e-3, f"{name} should not match: {r}"
        else:
            assert r["max_abs_diff"] <= ATOL, f"{name}: {r}"
    print(json.dumps({k: f"{v['max_abs_diff']:.1e}" for k, v in results.items()}, indent=1))


@pytest.mark.xdist_group("multiprocess")
def test_gloo_runs_megatron_cores_uneven_tp_collectives(moe_launch):
    """The alltoall dispatcher with expert TP and sequence parallelism gathers and
    reduce-scatters uneven token counts; gloo cannot, cpu_mode's (e) makes it (the TP2 x EP2
    training run needs it too)."""
    assert moe_launch["shims"] == {"uneven_gather_and_reduce_scatter": True}
