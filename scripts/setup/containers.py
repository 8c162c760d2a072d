"""Which torch each NVIDIA PyTorch container ships, and whether megatron-core accepts it.

NVIDIA builds torch from a commit between releases and labels it a pre-release of the next one:
NGC 24.12 ships ``2.6.0a0+df5bbc09d1``. PEP 440 orders that *before* 2.6.0, so pip refuses it for
megatron-core 0.16.1's ``torch>=2.6.0``: with torch constrained to the container's build the
install cannot resolve (the old Dockerfile on 25.01), and without the constraint pip fetches a
PyPI torch over the container's, breaking Transformer Engine and Apex, which are compiled
against it (the original usage on 24.12). Its *release*, 2.6.0, is what megatron-core means, so
the installer compares releases and installs megatron-core without dependencies:

    >>> check_torch("2.6.0a0+df5bbc09d1", ">=2.6.0").verdict     # NGC 24.12 / 25.01
    'release'
    >>> check_torch("2.8.0a0+5228986c39", ">=2.6.0").verdict     # NGC 25.06: pip accepts it too
    'satisfied'
    >>> check_torch("2.5.0a0+e000cf0ad9", ">=2.6.0").verdict     # NGC 24.10: refused
    'refused'

``scripts/setup/install_requirements.sh`` runs this module, ``plan`` before anything is installed
and ``verify`` after, so it imports only the standard library and ``packaging`` (pip's vendored
copy when ``packaging`` itself is missing), and the Dockerfile can copy it without the rest of
the package. ``tests/unit/test_container_requirements.py`` checks the Dockerfile's base image
against the table below.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import sys
from typing import Literal

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version
except ImportError:  # a bare interpreter before `packaging` is installed: pip always has it
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.version import InvalidVersion, Version


@dataclasses.dataclass(frozen=True)
class NgcContainer:
    tag: str
    """``YY.MM`` of ``nvcr.io/nvidia/pytorch:YY.MM-py3``."""
    torch: str
    """``torch.__version__`` as the release notes print it (the image may append ``.nvYY.MM``)."""
    python: str | None
    """``major.minor`` where recorded here, else None."""

    @property
    def image(self) -> str:
        return f"nvcr.io/nvidia/pytorch:{self.tag}-py3"


#: Source: NVIDIA PyTorch container release notes,
#: https://docs.nvidia.com/deeplearning/frameworks/pytorch-release-notes/ (torch per release;
#: every 25.xx ships Python 3.12). Add a row when adopting a newer container.
NGC_PYTORCH: dict[str, NgcContainer] = {c.tag: c for c in (
    NgcContainer("24.10", "2.5.0a0+e000cf0ad9", None),
    NgcContainer("24.11", "2.6.0a0+df5bbc0", None),
    NgcContainer("24.12", "2.6.0a0+df5bbc09d1", None),
    NgcContainer("25.01", "2.6.0a0+ecf3bae40a", "3.12"),
    NgcContainer("25.02", "2.7.0a0+6c54963f75", "3.12"),
    NgcContainer("25.03", "2.7.0a0+7c8ec84dab", "3.12"),
    NgcContainer("25.04", "2.7.0a0+79aa17489c", "3.12"),
    NgcContainer("25.05", "2.8.0a0+5228986c39", "3.12"),
    NgcContainer("25.06", "2.8.0a0+5228986c39", "3.12"),
)}

#: megatron-core's torch requirement, needed before megatron-core is installed. It mirrors the
#: Requires-Dist of the pin in requirements-megatron-core.txt (0.16.1); the unit test compares it
#: with the installed wheel, and `verify` re-checks against the real metadata after installing.
MEGATRON_CORE_TORCH = ">=2.6.0"

#: Installed distributions pinned to their installed version while installing: torch and what is
#: compiled against it, which no requirement may replace.
PINNED = ("torch", "torchvision", "torchaudio", "triton", "pytorch-triton", "transformer-engine",
          "transformer-engine-torch", "transformer-engine-cu12", "apex", "flash-attn")

Verdict = Literal["satisfied", "release", "refused", "absent"]


@dataclasses.dataclass(frozen=True)
class TorchCheck:
    """What the installer does about megatron-core given the installed torch.

    ``verdict``: ``satisfied`` (pip itself accepts this torch), ``release`` (only its release
    does: an NVIDIA pre-release build), ``refused`` (too old, or otherwise outside the
    specifier: stop), ``absent`` (no torch: install normally). ``no_deps``: install megatron-core
    with ``--no-deps``, whenever torch is there.
    """

    verdict: Verdict
    no_deps: bool
    message: str

    @property
    def ok(self) -> bool:
        return self.verdict != "refused"


def ngc_tags_for(torch_version: str) -> list[str]:
    """Container tags shipping this torch:
    ``"2.8.0a0+5228986c39.nv25.6"`` -> ``["25.05", "25.06"]``."""
    return [c.tag for c in NGC_PYTORCH.values()
            if torch_version == c.torch or torch_version.startswith(c.torch + ".")]


def release_of(version: str) -> Version:
    """The release a pre-release build leads to: ``"2.6.0a0+df5bbc09d1"`` -> ``2.6.0``."""
    return Version(".".join(str(p) for p in Version(version).release))


def working_containers(spec: str) -> tuple[list[str], list[str]]:
    """(tags accepted only by release version, tags pip accepts as is) for a torch specifier."""
    by_release, as_is = [], []
    for c in NGC_PYTORCH.values():
        if SpecifierSet(spec).contains(c.torch, prereleases=True):
            as_is.append(c.tag)
        elif SpecifierSet(spec).contains(release_of(c.torch)):
            by_release.append(c.tag)
    return by_release, as_is


def check_torch(installed: str | None, spec: str = MEGATRON_CORE_TORCH,
                package: str = "megatron-core") -> TorchCheck:
    """Decide about ``package`` (which asks for ``torch{spec}``) given the installed torch.

    pip accepts an *installed* pre-release when its version is in the specifier
    (``contains(..., prereleases=True)``), so 2.8.0a0 passes ``>=2.6.0`` as is; 2.6.0a0 does not,
    and passes only by its release 2.6.0.
    """
    want = f"{package} asks for torch{spec}"
    if installed is None:
        return TorchCheck("absent", False, (
            f"no torch in this python: {want}, so pip will install one from PyPI with it (a "
            "multi-GB CUDA build on Linux). For a CPU-only machine install the CPU build first, "
            "as `make venv` does: `pip install torch==2.13.0`, then re-run this script. On a GPU "
            "cluster use the container instead (README, step 0). Installing normally."))
    tags = ngc_tags_for(installed)
    name = f"torch {installed}" + (f" (NGC {'/'.join(tags)})" if tags else "")
    specifier = SpecifierSet(spec)
    try:
        release = release_of(installed)
    except InvalidVersion:
        return TorchCheck("refused", True, f"{name} is not a PEP 440 version; {want}.")
    if specifier.contains(installed, prereleases=True):
        return TorchCheck("satisfied", True, (
            f"{name} satisfies {package}'s torch{spec} as is; installing {package} without "
            "dependencies all the same, so pip leaves this torch and what is built against it "
            "alone"))
    if specifier.contains(release):
        return TorchCheck("release", True, (
            f"{name} is a {release} pre-release build; {want}; accepted by release version, "
            f"installing {package} without dependencies so pip leaves this torch alone"))
    by_release, as_is = working_containers(spec)
    floors = [Version(s.version) for s in specifier if s.operator in (">=", ">", "~=")]
    what = "too old" if floors and release < max(floors) else "not accepted"
    return TorchCheck("refused", True, (
        f"{name} is {what}: {want}, and its release {release} does not satisfy that. Use an "
        f"NVIDIA PyTorch container (nvcr.io/nvidia/pytorch:YY.MM-py3) that works: "
        f"{', '.join(by_release)} through this installer (pre-release builds, accepted by "
        f"release version), {', '.join(as_is)} as is (README, step 0)"))


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def constraint_lines(installed: dict[str, str | None]) -> list[str]:
    """``name==version`` for each pinned distribution that is installed with a valid version:
    ``{"torch": "2.6.0a0+df5bbc09d1", "apex": "0.1", "flash-attn": None}`` ->
    ``["torch==2.6.0a0+df5bbc09d1", "apex==0.1"]``."""
    lines = []
    for name, version in installed.items():
        if version is None:
            continue
        try:
            Version(version)
        except InvalidVersion:
            print(f"note: not pinning {name} {version!r} (not a PEP 440 version)", file=sys.stderr)
            continue
        lines.append(f"{name}=={version}")
    return lines


def torch_requirement(dist: str = "megatron-core") -> str | None:
    """The torch specifier an installed distribution declares (markers evaluated here)."""
    env = {**default_environment(), "extra": ""}
    for line in importlib.metadata.requires(dist) or []:
        req = Requirement(line)
        if req.name == "torch" and (req.marker is None or req.marker.evaluate(env)):
            return str(req.specifier)
    return None


# --- the two steps of scripts/setup/install_requirements.sh

def pinned_requirement(path: str) -> str:
    """The one requirement of ``path``, for messages:
    ``megatron-core==0.16.1`` -> ``megatron-core 0.16.1``."""
    with open(path) as f:
        lines = [ln.split("#")[0].strip() for ln in f]
    (line,) = [ln for ln in lines if ln]
    req = Requirement(line)
    pins = [s.version for s in req.specifier if s.operator == "=="]
    return f"{req.name} {pins[0]}" if pins else str(req)


def plan(constraints: str, requirement_file: str) -> int:
    """Write the constraints file, say what will happen, print ``no-deps`` or ``deps``."""
    pins = constraint_lines({name: installed_version(name) for name in PINNED})
    with open(constraints, "w") as f:
        f.write("".join(line + "\n" for line in pins))
    check = check_torch(installed_version("torch"), MEGATRON_CORE_TORCH,
                        pinned_requirement(requirement_file))
    if not check.ok:
        print(f"error: {check.message}", file=sys.stderr)
        return 1
    print(check.message, file=sys.stderr)
    if pins:
        print(f"pinned while installing: {', '.join(pins)}", file=sys.stderr)
    print("no-deps" if check.no_deps else "deps")
    return 0


def verify() -> int:
    """After installing: megatron-core's own metadata against the installed torch, its other
    requirements present, versions printed, ``megatron.core`` imports."""
    mcore = installed_version("megatron-core")
    if mcore is None:
        print("error: megatron-core is not installed after the install step", file=sys.stderr)
        return 1
    spec = torch_requirement("megatron-core") or ""
    check = check_torch(installed_version("torch"), spec, f"megatron-core {mcore}")
    if not check.ok or check.verdict == "absent":
        print(f"error: {check.message}", file=sys.stderr)
        return 1
    env = {**default_environment(), "extra": ""}
    for line in importlib.metadata.requires("megatron-core") or []:
        req = Requirement(line)
        if req.name == "torch" or (req.marker is not None and not req.marker.evaluate(env)):
            continue
        have = installed_version(req.name)
        if have is None:
            print(f"error: megatron-core {mcore} needs {req}, which is not installed; add it to "
                  "requirements.txt (megatron-core is installed without dependencies)",
                  file=sys.stderr)
            return 1
        if not req.specifier.contains(have, prereleases=True):
            print(f"note: megatron-core asks for {req}, {req.name} {have} is installed (kept: "
                  "the environment pins it)", file=sys.stderr)
    try:
        import warnings

        with warnings.catch_warnings():  # "TE/Apex not installed" fallbacks on a CPU machine
            warnings.simplefilter("ignore")
            import megatron.core  # noqa: F401
    except Exception as e:
        print(f"error: megatron.core does not import: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    how = {"satisfied": "as is", "release": "by release version"}[check.verdict]
    te = installed_version("transformer-engine") or installed_version("transformer-engine-torch")
    print(f"installed: torch {installed_version('torch')} (accepted {how} for megatron-core's "
          f"torch{spec}), megatron-core {mcore}, transformer-engine {te or 'not installed'}, "
          f"apex {installed_version('apex') or 'not installed'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="the version checks of scripts/setup/install_requirements.sh")
    sub = p.add_subparsers(dest="step", required=True,
                         help="plan: decide the pins before installing; verify: check what was installed")
    step = sub.add_parser("plan", help="write --constraints, print the decision")
    step.add_argument("--constraints", required=True, help="constraints file to write")
    step.add_argument("--requirement-file", required=True,
                      help="requirements-megatron-core.txt (names the package in messages)")
    sub.add_parser("verify", help="check what was installed")
    args = p.parse_args(argv)
    return plan(args.constraints, args.requirement_file) if args.step == "plan" else verify()


if __name__ == "__main__":
    sys.exit(main())
