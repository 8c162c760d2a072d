"""Pure data modules stay pure: no torch, no megatron-core, no torch.distributed on import."""

import subprocess
import sys


def test_pure_modules_import_without_torch_or_megatron_core():
    code = (
        "import sys\n"
        "import megatron.sft.data.formats, megatron.sft.data.prompt_styles, megatron.sft.data.chat_template\n"
        "import megatron.sft.data.render, megatron.sft.data.packing, megatron.sft.data.readers\n"
        "import megatron.sft.data.tokenizer_edit, megatron.sft.data.loss_mask\n"
        "import megatron.sft.data.inspect, megatron.sft.data.render_flags\n"
        "import megatron.sft.data.eval_prompts\n"
        # not pure, but torch-free on purpose: a preview of a prefix starts in about a second
        "import megatron.sft.data.indexed_reader, megatron.sft.data.inspect_io\n"
        "bad = [m for m in ('torch', 'torch.distributed', 'megatron.core') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_package_docstring_lists_every_module():
    from pathlib import Path

    import megatron.sft.data as data

    folder = Path(data.__file__).parent
    modules = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
    missing = [m for m in modules if f"``{m}``" not in data.__doc__]
    assert not missing, f"add {missing} to megatron/sft/data/__init__.py's module list"
