"""An installed copy (pip install .) imports megatron.sft next to pip's megatron.core, from a
directory outside the checkout."""

import subprocess
import sys

from sft_testing import REPO


def test_installed_copy_shares_the_megatron_namespace(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(REPO)],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    assert not (target / "megatron" / "__init__.py").exists()
    code = ("import megatron.sft, megatron.core, megatron.sft.bridge.convert, sys\n"
            "print(megatron.sft.__file__); print(megatron.core.__file__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    sft_file, core_file = run.stdout.split()
    assert sft_file.startswith(str(target)) and str(REPO) not in sft_file
    assert "site-packages" in core_file


def test_pyproject_and_requirements_agree():
    """The package's dependencies are what the installer installs: requirements.txt plus the
    megatron-core pin, which lives apart so that plain `pip install -r requirements.txt` never
    pulls a torch."""
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = [line.strip() for name in ("requirements.txt", "requirements-megatron-core.txt")
              for line in (REPO / name).read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert sorted(declared) == sorted(listed)
