"""The setup step's child: which attention backends and experts implementations run here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

from gpu_proof_parts.processes import _free_gb, _write_json
from gpu_proof_parts.settings import CONFIGS, GLOBAL_BATCH, TINY_GLOBAL_BATCH, TINY_SEQ


def probe(args) -> dict:
    """Versions, device, and which attention backends / experts implementations run here
    (state/setup.json; printed as '## ' lines, which the orchestrator echoes)."""
    import importlib.metadata as md
    import platform

    info: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                            "versions": {}, "error": None}
    for name in ("torch", "megatron-core", "transformers", "safetensors", "tokenizers", "peft",
                 "pyarrow", "triton", "einops", "numpy", "pytest", "pytest-xdist",
                 "transformer-engine", "transformer_engine"):
        try:
            info["versions"][name] = md.version(name)
        except md.PackageNotFoundError:
            info["versions"][name] = "missing"
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=torch.cuda.get_device_name(0),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported())
    else:
        info["device_name"] = "cpu"
        if args.device == "cuda":
            info["error"] = "no CUDA device (torch.cuda.is_available() is False): use --device cpu"
    import importlib.util

    found = importlib.util.find_spec("megatron.core")  # located, not imported (seconds)
    if found is None:
        info["error"] = info["error"] or "megatron-core is not installed here (pass --wheels)"
    else:
        info["megatron_core_path"] = str(Path(found.origin).parent)
    from megatron.sft.model.attention import attention_backends
    from megatron.sft.model.layer_impl import resolve_layer_impl, transformer_engine_available

    info["transformer_engine"] = transformer_engine_available()
    info["attention"] = {}
    for spec in attention_backends():
        impl = "transformer_engine" if spec.needs_te_layers else "auto"
        try:
            resolve_layer_impl(impl, spec.name, args.device)
            info["attention"][spec.name] = "ok"
        except Exception as e:  # LayerImplError: the reason, with the alternative
            info["attention"][spec.name] = str(e).splitlines()[0][:200]
    try:
        from megatron.sft.model.moe import experts as experts_mod
    except ImportError:
        info["experts"] = "MoE not available in this build"
    else:
        linear = "te" if info["transformer_engine"] and args.device == "cuda" else "local"
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        info["experts"] = {}
        for choice in getattr(experts_mod, "MOE_EXPERTS_IMPLS", ()):
            if choice == "auto":
                continue
            try:
                experts_mod.resolve_experts_impl(choice, linear, args.device, dtype)
                info["experts"][choice] = "ok"
            except Exception as e:
                info["experts"][choice] = str(e).splitlines()[0][:200]
    work = Path(args.workdir)
    info["free_gb"] = {str(p): round(_free_gb(p), 1) for p in (work, Path("/dev/shm"),
                                                               Path("/tmp")) if p.exists()}
    info["cpus"] = os.cpu_count()
    _write_json(Path(args.workdir) / "state" / "setup.json", info)
    v = info["versions"]
    print(f"## python {info['python']} ({sys.executable}); torch {v['torch']} (CUDA "
          f"{info['torch_cuda']}); megatron-core {v['megatron-core']} "
          f"({info.get('megatron_core_path', 'not found')}); transformers {v['transformers']}; "
          f"safetensors {v['safetensors']}; tokenizers {v['tokenizers']}; peft {v['peft']}; "
          f"pyarrow {v['pyarrow']}; triton {v['triton']}; Transformer Engine "
          f"{'yes' if info['transformer_engine'] else 'no'}", flush=True)
    print(f"## device: {info['device_name']}"
          + (f" (sm {info['capability']}, {info['gpu_memory_gib']} GiB)"
             if info.get("capability") else ""), flush=True)
    for name, why in info["attention"].items():
        print(f"## attention {name:<7} {why}", flush=True)
    if isinstance(info["experts"], str):
        print(f"## experts: {info['experts']}", flush=True)
    else:
        for name, why in info["experts"].items():
            print(f"## experts {name:<10} {why}", flush=True)
    print(f"## free space (GB): {info['free_gb']}; {info['cpus']} CPUs", flush=True)
    return info


def _runnable(backend: str, device: str) -> Optional[str]:
    """``None`` when ``backend`` runs on ``device``, else why not."""
    from megatron.sft.model.attention import get_attention_backend

    return get_attention_backend(backend).check("local", device)


def _configs(args) -> list[dict]:
    out = []
    for seq, backend, recompute in CONFIGS:
        s = TINY_SEQ[seq] if args.tiny else seq
        gbs = TINY_GLOBAL_BATCH[s] if args.tiny else GLOBAL_BATCH[seq]
        out.append({"key": f"{s} {backend} {recompute}", "seq": s, "backend": backend,
                    "recompute": recompute, "gbs": gbs})
    return out
