"""Write alignkit's pip constraints files (docs/install.md).

    python .ci/constraints.py lowest [--extra dev] [--skip torch]   the lower bound of every pin
    .venv/bin/python .ci/constraints.py lock                        the versions installed in this venv

`lowest` stands in for the `--resolution=lowest` pip does not have: `make test-lowest` installs with its
output. `lock` prints the exact version of every package alignkit[dev] pulls in, as installed in the
running interpreter's environment: constraints.txt after a deliberate, tested upgrade.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*)(;.*)?$")
FLOOR = re.compile(r"(?:>=|==|~=)\s*([^,\s]+)")
HEADER = """\
# The exact versions alignkit's tests pass with (Linux x86-64, CPython 3.11, CPU torch): the Makefile
# installs with `pip install -c constraints.txt -e ".[dev]"`. pyproject.toml holds the ranges a user's
# install may resolve to; this file is the one tested point inside them, `make test-lowest` the other.
# Regenerate after a deliberate upgrade: docs/install.md ("Updating the pins")."""


def read_project(pyproject: str) -> dict:
    import tomllib

    return tomllib.loads(Path(pyproject).read_text())["project"]


def lowest_pins(requirements: list[str], skip: set[str]) -> tuple[list[str], list[str]]:
    """`name==floor` lines for the requirements with a lower bound, and the names that have none."""
    pins, free = [], []
    for req in requirements:
        m = REQ.match(req)
        if not m:
            raise SystemExit(f"cannot read requirement {req!r}")
        name, spec, marker = m.group(1), m.group(3), m.group(4) or ""
        if name.lower() in skip:
            continue
        floor = FLOOR.search(spec)
        if floor:
            pins.append(f"{name}=={floor.group(1)}{marker}")
        else:
            free.append(name)
    return pins, free


def lowest(args: argparse.Namespace) -> None:
    project = read_project(args.pyproject)
    reqs = list(project["dependencies"])
    for extra in args.extra:
        reqs += project["optional-dependencies"][extra]
    pins, free = lowest_pins(reqs, {s.lower() for s in args.skip})
    if free:
        print(f"no lower bound (left to pip): {', '.join(free)}", file=sys.stderr)
    print(f"# the lowest versions {args.pyproject} allows; written by .ci/constraints.py lowest")
    print("\n".join(pins))


def installed_closure(root: str, extras: set[str]) -> dict[str, str]:
    """name -> installed version of every distribution `root[extras]` requires, transitively."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    dists = {canonicalize_name(d.metadata["Name"]): d for d in md.distributions()}
    seen: dict[str, set[str]] = {}
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        key = canonicalize_name(name)
        if key not in dists:
            raise SystemExit(f"{name} is required but not installed in {sys.prefix}")
        if key in seen and wanted <= seen[key]:
            continue
        seen[key] = seen.get(key, set()) | wanted
        for line in dists[key].requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ["", *seen[key]]):
                todo.append((req.name, set(req.extras)))
    seen.pop(canonicalize_name(root))
    return {dists[k].metadata["Name"]: dists[k].version.split("+")[0] for k in sorted(seen)}


def lock(args: argparse.Namespace) -> None:
    print(HEADER)
    for name, version in installed_closure("alignkit", {"dev"}).items():
        print(f"{name}=={version}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    low = sub.add_parser("lowest", help="the lower bound of every requirement")
    low.add_argument("pyproject", nargs="?", default="pyproject.toml")
    low.add_argument("--extra", action="append", default=[], help="also pin this optional-dependency group")
    low.add_argument("--skip", action="append", default=[], help="leave this package out (installed apart)")
    sub.add_parser("lock", help="the installed versions of alignkit[dev] and everything it pulls in")
    args = ap.parse_args()
    (lowest if args.what == "lowest" else lock)(args)


if __name__ == "__main__":
    main()
