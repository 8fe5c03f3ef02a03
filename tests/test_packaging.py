"""Installs that keep working: the pins, the constraints files, and recipes shipped inside the wheel
(docs/install.md)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# the frameworks whose private methods alignkit overrides or calls: a floor and a ceiling each
FRAMEWORKS = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")


def _constraints_module():
    spec = importlib.util.spec_from_file_location("ci_constraints", ROOT / ".ci" / "constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _project() -> dict:
    return _constraints_module().read_project(str(ROOT / "pyproject.toml"))


def _toml() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements() -> list[Requirement]:
    project = _project()
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def _locked() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = Version(version)
    return pins


def test_frameworks_have_a_floor_and_a_ceiling():
    reqs = {r.name: r for r in _requirements()}
    for name in FRAMEWORKS:
        ops = {s.operator for s in reqs[name].specifier}
        assert ">=" in ops and "<" in ops, f"{name}: {reqs[name]} needs a lower and an upper bound"


def test_constraints_pin_every_requirement_inside_its_range():
    locked = _locked()
    for req in _requirements():
        key = req.name.lower().replace("_", "-")
        assert key in locked, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(locked[key], prereleases=True), f"{req.name}=={locked[key]} is outside {req}"


def test_lowest_constraints_pin_each_floor_and_keep_markers():
    module = _constraints_module()
    pins, free = module.lowest_pins(
        ["torch>=2.4,<3", "trl>=1.16,<1.17", "tomli>=2; python_version < '3.11'", "jinja2", "Foo_Bar[x]~=1.2"],
        skip={"torch"})
    assert pins == ["trl==1.16", "tomli==2; python_version < '3.11'", "Foo_Bar==1.2"]
    assert free == ["jinja2"]


def test_lowest_constraints_of_the_project_cover_every_requirement():
    out = subprocess.run([sys.executable, str(ROOT / ".ci" / "constraints.py"), "lowest", str(ROOT / "pyproject.toml"),
                          "--extra", "dev", "--skip", "torch"], capture_output=True, text=True, check=True).stdout
    pinned = {line.split("==")[0] for line in out.splitlines() if "==" in line}
    assert pinned == {r.name for r in _requirements()} - {"torch"}
    assert "no lower bound" not in out


def test_build_backend_writes_the_spdx_license():
    """`license = "Apache-2.0"` is a PEP 639 expression: hatchling writes it as License-Expression (core
    metadata 2.4) from 1.27 on; 1.26 writes the legacy License field (measured: docs/install.md)."""
    toml = _toml()
    assert isinstance(toml["project"]["license"], str)
    (req,) = [Requirement(r) for r in toml["build-system"]["requires"] if r.startswith("hatchling")]
    assert toml["build-system"]["build-backend"] == "hatchling.build"
    assert not req.specifier.contains("1.26.3") and req.specifier.contains("1.27.0")
    assert toml["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"] == {"recipes": "alignkit/recipes"}


def test_recipes_dir_prefers_the_copy_a_wheel_carries(tmp_path, monkeypatch):
    from alignkit.cli import recipes

    monkeypatch.delenv("ALIGNKIT_RECIPES", raising=False)
    assert recipes.recipes_dir() == ROOT / "recipes"  # a checkout: the repository's recipes/
    site = tmp_path / "site-packages"
    (site / "alignkit" / "cli").mkdir(parents=True)
    monkeypatch.setattr(recipes, "__file__", str(site / "alignkit" / "cli" / "recipes.py"))
    assert recipes.recipes_dir() == site / "recipes"  # nothing packaged: the checkout layout
    (site / "alignkit" / "recipes").mkdir()
    assert recipes.recipes_dir() == site / "alignkit" / "recipes"
    monkeypatch.setenv("ALIGNKIT_RECIPES", str(tmp_path))
    assert recipes.recipes_dir() == tmp_path


@pytest.mark.slow
def test_the_wheel_ships_the_recipes_and_runs_one(tmp_path):
    """Build the wheel, install it alone (the dependencies are this interpreter's) away from the checkout,
    then `alignkit recipes ls` and `alignkit run sft-tiny` from an empty directory."""
    dist, site, work = tmp_path / "dist", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "-w", str(dist), str(ROOT)], check=True)
    (wheel,) = dist.glob("alignkit-*.whl")
    subprocess.run([*pip, "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)], check=True)
    assert sorted(p.name for p in (site / "alignkit" / "recipes").glob("*.yaml")) == \
        sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "250", "HF_HUB_OFFLINE": "1"}
    env.pop("ALIGNKIT_RECIPES", None)

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    assert run(sys.executable, "-c", "import alignkit; print(alignkit.__file__)").strip() == \
        str(site / "alignkit" / "__init__.py")
    alignkit = str(site / "bin" / "alignkit")
    listing = run(alignkit, "recipes", "ls")
    assert re.search(r"recipes in .*site/alignkit/recipes", listing) and "sft-tiny" in listing, listing
    run(alignkit, "run", "sft-tiny")
    assert (work / "runs" / "sft-tiny" / "summary.json").is_file()
