"""The container path builds: the Dockerfile's base image ships a torch that every torch
requirement of what it installs accepts, and the installer (scripts/setup/install_requirements.sh)
keeps a container's torch while installing megatron-core in older containers too.

No network, no Docker: the base image's torch comes from the release-notes table in
scripts/setup/containers.py, the requirements' own dependencies from this environment's
installed metadata (what `make venv` installed from the same files), and the installer runs with
--dry-run against fake environments (a folder of .dist-info directories).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from sft_testing import REPO

sys.path.insert(0, str(REPO / "scripts" / "setup"))  # the installer's checks live beside it
import containers  # noqa: E402
from containers import NGC_PYTORCH, check_torch, constraint_lines, ngc_tags_for  # noqa: E402

INSTALLER = REPO / "scripts" / "setup" / "install_requirements.sh"
#: what scripts/setup/install_requirements.sh installs (it names both files; checked below)
INSTALLER_FILES = ("requirements.txt", "requirements-megatron-core.txt")


# --- what the Dockerfile builds on and installs

def base_image_tag(dockerfile: str) -> str:
    """``YY.MM`` of the NVIDIA PyTorch image the Dockerfile starts from (``FROM ${BASE_IMAGE}``
    reads the ``ARG BASE_IMAGE=`` default)."""
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", dockerfile, re.M))
    (image,) = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], image)
    match = re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\d\d\.\d\d)-py3", image)
    assert match, f"the Dockerfile starts from {image}, not an NVIDIA PyTorch container"
    return match.group(1)


def installed_files(dockerfile: str) -> list[str]:
    """Requirement files the Dockerfile installs: the installer's and its own ``-r FILE``."""
    files = list(INSTALLER_FILES) if "scripts/setup/install_requirements.sh" in dockerfile else []
    return files + [f for f in re.findall(r"-r\s+(\S+)", dockerfile) if f not in files]


def requirement_lines(path: Path) -> list[Requirement]:
    lines = (ln.split("#")[0].strip() for ln in path.read_text().splitlines())
    return [Requirement(ln) for ln in lines if ln and not ln.startswith("-")]


def torch_requirements(files: list[str], python: str | None) -> list[tuple[str, SpecifierSet]]:
    """Every torch specifier reachable from the files' requirements: their own lines and, walked
    recursively through the installed distributions' Requires-Dist (markers evaluated for the
    container's python and the extras asked for), e.g.
    ``("requirements-megatron-core.txt -> megatron-core 0.16.1", SpecifierSet(">=2.6.0"))``."""
    env = default_environment()
    if python:
        env.update(python_version=python, python_full_version=f"{python}.0")
    found, seen = [], set()
    todo = [(req, name) for name in files for req in requirement_lines(REPO / name)]
    while todo:
        req, chain = todo.pop()
        if req.name == "torch":
            found.append((chain, req.specifier))
            continue
        key = (req.name.lower(), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here: nothing to walk
        if python:
            requires_python = dist.metadata.get("Requires-Python")
            assert not requires_python or SpecifierSet(requires_python).contains(f"{python}.0"), (
                f"{chain} -> {dist.metadata['Name']} {dist.version} requires Python "
                f"{requires_python}; the container has {python}")
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({**env, "extra": extra})
                                         for extra in {"", *req.extras}):
                todo.append((sub, f"{chain} -> {dist.metadata['Name']} {dist.version}"))
    return found


def test_dockerfile_base_torch_satisfies_every_torch_requirement():
    dockerfile = (REPO / "Dockerfile").read_text()
    tag = base_image_tag(dockerfile)
    assert tag in NGC_PYTORCH, (f"nvcr.io/nvidia/pytorch:{tag}-py3 is not in NGC_PYTORCH "
                                "(scripts/setup/containers.py): add its torch version")
    container = NGC_PYTORCH[tag]
    found = torch_requirements(installed_files(dockerfile), container.python)
    assert any("megatron-core" in chain for chain, _ in found), (
        f"the Dockerfile does not install megatron-core ({found}): run "
        "scripts/setup/install_requirements.sh there")
    # pip accepts an installed pre-release when the specifier contains it (prereleases=True)
    unmet = [f"{chain} asks for torch{spec}" for chain, spec in found
             if not spec.contains(container.torch, prereleases=True)]
    assert not unmet, (f"nvcr.io/nvidia/pytorch:{tag}-py3 ships torch {container.torch}, which "
                       "pip rejects for: " + "; ".join(unmet)
                       + ". Choose a newer BASE_IMAGE (see NGC_PYTORCH).")


def test_installer_installs_the_files_the_test_reads():
    script = INSTALLER.read_text()
    for name in INSTALLER_FILES:
        assert f'"$REPO_ROOT/{name}"' in script
    assert "scripts/setup/install_requirements.sh" in (REPO / "Dockerfile").read_text()
    assert "scripts/setup/install_requirements.sh" in (REPO / "Makefile").read_text()


def test_base_image_tag_reads_arg_default_and_literal_from():
    assert base_image_tag("ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3\n"
                          "FROM ${BASE_IMAGE}\n") == "25.01"
    assert base_image_tag("FROM nvcr.io/nvidia/pytorch:24.12-py3\n") == "24.12"


def test_containers_module_runs_before_anything_is_installed():
    """The Dockerfile copies scripts/setup/containers.py alone and runs it on a bare
    container python: standard library and packaging only (megatron.core only in `verify`)."""
    import ast

    tree = ast.parse((REPO / "scripts/setup/containers.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    outside = {m for m in names if m.split(".")[0] not in sys.stdlib_module_names
               and m.split(".")[0] not in ("packaging", "pip") and m != "megatron.core"}
    assert not outside, outside


# --- the megatron-core pin, its torch requirement and its other dependencies

def test_megatron_core_pin_matches_what_is_installed_and_the_installers_torch_spec():
    (pin,) = requirement_lines(REPO / "requirements-megatron-core.txt")
    assert pin.name == "megatron-core"
    assert pin.specifier.contains(importlib.metadata.version("megatron-core"))
    # the installer checks torch before megatron-core is installed, from this constant
    assert containers.torch_requirement("megatron-core") == containers.MEGATRON_CORE_TORCH
    assert containers.pinned_requirement(str(REPO / "requirements-megatron-core.txt")) \
        == f"megatron-core {importlib.metadata.version('megatron-core')}"


def test_requirements_txt_never_asks_for_torch_or_megatron_core():
    """Plain `pip install -r requirements.txt` (the original usage, in the container too) must not
    be able to replace a container's torch."""
    env = {**default_environment(), "extra": ""}
    for req in requirement_lines(REPO / "requirements.txt"):
        assert req.name not in ("torch", "megatron-core")
        try:
            requires = importlib.metadata.requires(req.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        direct = [r for r in map(Requirement, requires) if r.name in ("torch", "megatron-core")
                  and (r.marker is None or r.marker.evaluate(env))]
        assert not direct, f"{req.name} asks for {direct}"


def test_megatron_core_dependencies_besides_torch_are_in_requirements_txt():
    """megatron-core is installed with --no-deps where torch exists: requirements.txt brings
    the rest."""
    env = {**default_environment(), "extra": ""}
    listed = {r.name.lower() for r in requirement_lines(REPO / "requirements.txt")}
    needed = {r.name.lower() for r in map(Requirement, importlib.metadata.requires("megatron-core"))
              if r.name != "torch" and (r.marker is None or r.marker.evaluate(env))}
    assert needed <= listed, f"add {sorted(needed - listed)} to requirements.txt"


# --- the installer's decision

@pytest.mark.parametrize("torch_version, verdict, words", [
    ("2.6.0a0+df5bbc09d1", "release", ["(NGC 24.12)", "2.6.0 pre-release build",
                                       "accepted by release version", "without dependencies"]),
    ("2.6.0a0+ecf3bae40a", "release", ["(NGC 25.01)", "accepted by release version"]),
    ("2.8.0a0+5228986c39", "satisfied", ["(NGC 25.05/25.06)", "as is", "without dependencies"]),
    ("2.13.0", "satisfied", ["torch 2.13.0 satisfies"]),
    ("2.5.0a0+e000cf0ad9", "refused", ["(NGC 24.10)", "too old", "torch>=2.6.0",
                                       "24.11, 24.12, 25.01 through this installer",
                                       "25.02, 25.03, 25.04, 25.05, 25.06 as is"]),
    (None, "absent", ["no torch", "pip install torch==2.13.0", "Installing normally"]),
])
def test_torch_decision(torch_version, verdict, words):
    check = check_torch(torch_version, ">=2.6.0", "megatron-core 0.16.1")
    assert check.verdict == verdict
    assert check.ok == (verdict != "refused")
    assert check.no_deps == (torch_version is not None)  # never let pip resolve a present torch
    for w in words:
        assert w in check.message, check.message


def test_pip_itself_rejects_the_2_6_pre_release_builds():
    """Why the installer needs the release comparison (and the old 25.01 Dockerfile failed)."""
    spec = SpecifierSet(containers.MEGATRON_CORE_TORCH)
    assert not spec.contains(NGC_PYTORCH["24.12"].torch, prereleases=True)
    assert not spec.contains(NGC_PYTORCH["25.01"].torch, prereleases=True)
    assert spec.contains(NGC_PYTORCH["25.02"].torch, prereleases=True)


def test_container_lookup_and_pins():
    assert ngc_tags_for("2.8.0a0+5228986c39.nv25.6") == ["25.05", "25.06"]
    assert ngc_tags_for("2.6.0a0+df5bbc09d1") == ["24.12"]
    assert ngc_tags_for("2.13.0+cpu") == []
    pins = constraint_lines({"torch": "2.6.0a0+df5bbc09d1", "apex": "0.1", "flash-attn": None,
                             "triton": "not a version"})
    assert pins == ["torch==2.6.0a0+df5bbc09d1", "apex==0.1"]


# --- the installer, dry run, against fake environments

def fake_python(tmp_path: Path, dists: dict[str, str]) -> tuple[str, dict[str, str]]:
    """A python that sees only ``dists`` (name -> version, as .dist-info folders) and packaging:
    the real interpreter without site-packages (``-S``)."""
    site = tmp_path / "site"
    site.mkdir()
    for name, version in dists.items():
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    import packaging

    (site / "packaging").symlink_to(Path(packaging.__file__).parent)
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    wrapper.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "PYTHON": str(wrapper), "PYTHONPATH": str(site)}
    return str(wrapper), env


def dry_run(tmp_path, dists, *args):
    _, env = fake_python(tmp_path, dists)
    r = subprocess.run(["bash", str(INSTALLER), "--dry-run", *args], capture_output=True,
                       text=True, env=env, timeout=60)
    pip = [ln for ln in r.stdout.splitlines() if ln.startswith("+ ") and " -m pip " in ln]
    return r, pip


def test_installer_in_ngc_24_12_pins_the_container_and_skips_megatron_cores_deps(tmp_path):
    r, pip = dry_run(tmp_path, {"torch": "2.6.0a0+df5bbc09d1", "transformer-engine": "1.13.0",
                                "apex": "0.1"}, "-r", "requirements-dev.txt")
    assert r.returncode == 0, r.stderr
    assert "accepted by release version" in r.stderr and "(NGC 24.12)" in r.stderr
    assert ("pinned while installing: torch==2.6.0a0+df5bbc09d1, transformer-engine==1.13.0, "
            "apex==0.1") in r.stderr
    assert len(pip) == 2
    assert "-r requirements-dev.txt" in pip[0] and "--no-deps" not in pip[0]
    assert pip[0].count(" -c ") == pip[1].count(" -c ") == 1
    assert "--no-deps" in pip[1] and pip[1].endswith("requirements-megatron-core.txt")
    assert "scripts/setup/containers.py verify" in r.stdout


def test_installer_in_ngc_25_06(tmp_path):
    r, pip = dry_run(tmp_path, {"torch": "2.8.0a0+5228986c39"})
    assert r.returncode == 0, r.stderr
    assert "satisfies megatron-core 0.16.1's torch>=2.6.0 as is" in r.stderr
    assert "--no-deps" in pip[1]


def test_installer_refuses_a_too_old_torch_before_installing_anything(tmp_path):
    r, pip = dry_run(tmp_path, {"torch": "2.5.0a0+e000cf0ad9"})
    assert r.returncode == 1
    assert "error: torch 2.5.0a0+e000cf0ad9 (NGC 24.10) is too old" in r.stderr
    assert "25.06" in r.stderr and pip == []


def test_installer_without_torch_installs_normally_and_says_how_to_get_the_cpu_build(tmp_path):
    r, pip = dry_run(tmp_path, {})
    assert r.returncode == 0, r.stderr
    assert "no torch in this python" in r.stderr and "pip install torch==2.13.0" in r.stderr
    assert len(pip) == 2 and not any("--no-deps" in p for p in pip)


# --- a missing megatron-core or torch is one clear line, not a traceback

@pytest.mark.parametrize("module, words", [("megatron.core", "install_requirements.sh"),
                                           ("torch", "pip install torch==2.13.0")])
def test_cli_names_the_command_for_a_missing_package(module, words, capsys):
    from megatron.sft.cli import run_cli

    def main():
        raise ModuleNotFoundError(f"No module named {module!r}", name=module)

    with pytest.raises(SystemExit) as e:
        run_cli(main)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err


def test_cli_keeps_the_traceback_for_other_missing_modules():
    from megatron.sft.cli import run_cli

    def main():
        raise ModuleNotFoundError("No module named 'megatron.core.not_there'",
                                  name="megatron.core.not_there")

    with pytest.raises(ModuleNotFoundError):
        run_cli(main)


def test_download_check_without_torch(tmp_path):
    """Step 1 in a user account that ran only `pip install -r requirements.txt` (no torch)."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    (model / "model.safetensors").write_bytes(b"")
    code = f"""
import importlib.util, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, NoTorch())
script = {str(REPO / "scripts/checkpoints/download_hf_models.py")!r}
spec = importlib.util.spec_from_file_location("dl", script)
dl = importlib.util.module_from_spec(spec); spec.loader.exec_module(dl)
print(dl.check_model_dir(__import__("pathlib").Path({str(model)!r})))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert "Qwen2ForCausalLM (not checked against the converter here: torch is not installed)" \
        in r.stdout
