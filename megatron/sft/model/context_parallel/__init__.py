"""Context parallelism for packed rows: ``split`` (which tokens each CP rank holds, pure),
``kernels`` (local queries against all-gathered K/V, per backend) and ``gather`` (the K/V
all-gather whose backward reduce-scatters dK, dV)."""
