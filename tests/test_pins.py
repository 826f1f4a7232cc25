"""The dependencies CI tests are the ones a fresh `make venv` installs: pyproject.toml bounds the packages
whose behaviour the code relies on to the tested minors, constraints.txt (every package's tested version,
used by the Makefile) agrees with those bounds, and the installed versions fall inside them."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml itself")
ROOT = Path(__file__).resolve().parents[1]
# Lightning internals (kws_lightning/utils/lightning_private.py), the exporter, the config machinery.
BOUNDED = ("torch", "pytorch-lightning", "hydra-core", "omegaconf", "onnx", "onnxscript", "onnxruntime")


def requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found: dict[str, Requirement] = {}
    for line in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        requirement = Requirement(line)
        found.setdefault(requirement.name.lower(), requirement)
    return found


def constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            pins[name.strip().lower()] = Version(pinned.strip())
    return pins


@pytest.mark.parametrize("name", BOUNDED)
def test_tested_packages_have_an_upper_bound_that_holds(name: str) -> None:
    """Before: `pytorch-lightning>=2.2` and `torch>=2.1` let a fresh install take any future release."""
    requirement = requirements()[name]
    assert any(spec.operator == "<" for spec in requirement.specifier), f"{requirement}: no upper bound"
    assert requirement.specifier.contains(version(name), prereleases=True), (requirement, version(name))
    pinned = constraints().get(name)
    assert name == "torch" or (pinned is not None and requirement.specifier.contains(pinned)), (
        requirement,
        pinned,
    )


def test_constraints_pin_every_requirement_within_its_bounds_and_the_makefile_uses_them() -> None:
    pins = constraints()
    assert "torch" not in pins  # the Makefile installs torch first (CPU or CUDA build: TORCH_SPEC)
    for name, requirement in requirements().items():
        if name != "torch" and requirement.marker is None:
            assert name in pins and requirement.specifier.contains(pins[name]), (requirement, pins.get(name))
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^CONSTRAINTS \?= constraints\.txt$", makefile, re.M)
    assert "pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'" in makefile
