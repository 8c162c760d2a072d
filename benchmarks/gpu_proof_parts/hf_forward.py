"""The recipe's last check: export the trained checkpoint and run HF's forward on it."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from typing import Any

from gpu_proof_parts.processes import _paths, _write_json
from gpu_proof_parts.processes import run_script
from gpu_proof_parts.settings import REPO


def child_forward(args) -> int:
    return export_and_forward(args)


def export_and_forward(args) -> int:
    """``merge_and_export.sh`` of the recipe's run, then the export through transformers:
    load, one conversation through the chat template, a forward pass with labels
    (state/forward.json)."""
    p = _paths(args)
    cuda = args.device == "cuda"
    result: dict[str, Any] = {"finite": False}
    t0 = time.time()
    cmd = ["bash", str(REPO / "scripts/checkpoints/merge_and_export.sh"), str(p["save"]),
           str(p["hf"]), str(p["export"])]
    print(f"$ {shlex.join(cmd)}", flush=True)
    rc, output = run_script(cmd, dict(os.environ, PYTHON=sys.executable), in_process=args.tiny)
    print(output, flush=True)
    result["export_s"] = round(time.time() - t0, 1)
    if rc != 0:
        lines = [x for x in output.splitlines() if x.strip()]
        result["error"] = f"merge_and_export.sh exited {rc}: {lines[-1] if lines else ''}"
        _write_json(p["state"] / "forward.json", result)
        print(f"error: {result['error']}", flush=True)
        return 1
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(p["export"])
    model = AutoModelForCausalLM.from_pretrained(
        p["export"], dtype=torch.bfloat16 if cuda else torch.float32)
    model = model.to("cuda" if cuda else "cpu").eval()
    conv = json.loads(p["data_file"].read_text().splitlines()[0])
    text = tok.apply_chat_template(conv["messages"], tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :1024]
    ids = ids.to(model.device)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    result.update(loss=float(out.loss), logits_shape=list(out.logits.shape),
                  finite=bool(torch.isfinite(out.logits).all()),
                  architecture=type(model).__name__, dtype=str(model.dtype),
                  params=sum(x.numel() for x in model.parameters()),
                  vocab_size=model.config.vocab_size, forward_s=round(time.time() - t0, 1),
                  files=sorted(x.name for x in p["export"].iterdir()))
    _write_json(p["state"] / "forward.json", result)
    print(f"transformers forward of {p['export']}: {result}", flush=True)
    return 0 if result["finite"] else 1
