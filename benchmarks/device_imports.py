"""Runs a Python script with the imports the lent H200 machine could satisfy, and no others:

    python benchmarks/device_imports.py benchmarks/bench_gpu.py --device cpu --quick ...

A top-level import made by this repository's code or by a carried wheel's code succeeds only when
the package is in the standard library, this repository, `gpu_device_packages.txt` (the machine's
image) or `gpu_wheels.txt` (what travels); anything else is hidden, both from `import` and from
`importlib.util.find_spec` / `importlib.metadata` (which optional-dependency probes use), exactly as
if it were not installed. The device's own packages import what they like: the image is
consistent with itself, and the versions installed here (transformers, huggingface_hub...) may
need other helpers than the device's. So a new dependency that the wheels lack fails here, in CI,
instead of in the middle of a 10-minute lease with no network. Refusals are listed on stderr at
exit (`device_imports: hid X from Y`).
"""

from __future__ import annotations

import atexit
import importlib.machinery
import importlib.metadata
import os
import runpy
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from gpu_packages import canonical, carried_wheels, device_packages  # noqa: E402

REPOSITORY = {"ddserve", "models", "workers", "service", "benchmarks", "tests"}
IMPORTLIB = os.path.dirname(importlib.__file__)


class DeviceImports:
    """A meta-path finder in place of `PathFinder` that hides what the device would lack."""

    def __init__(self, allowed: set[str], carried: set[str]) -> None:
        self.allowed = allowed  # canonical distribution names
        self.distributions = importlib.metadata.packages_distributions()  # top → [dist]
        # importers held to the rule: this repository and the carried wheels' packages
        self.checked = REPOSITORY | {"__main__", "gpu_packages"}
        self.checked |= {
            top
            for top, dists in self.distributions.items()
            if any(canonical(d) in carried for d in dists)
        }
        self.hidden: dict[str, str] = {}

    def importer(self) -> str:
        """The top-level package of the code asking, past importlib's own frames."""
        frame = sys._getframe(2)
        while frame is not None:
            path = frame.f_code.co_filename
            if not (path.startswith("<frozen") or path.startswith(IMPORTLIB) or path == __file__):
                return str(frame.f_globals.get("__name__", "")).split(".")[0]
            frame = frame.f_back
        return ""

    def available(self, top: str) -> bool:
        if top in sys.stdlib_module_names or top in sys.builtin_module_names or top in REPOSITORY:
            return True
        return any(canonical(d) in self.allowed for d in self.distributions.get(top, []))

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or path is not None or "." in fullname or self.available(fullname):
            return spec
        importer = self.importer()
        if importer not in self.checked:
            return spec
        self.hidden.setdefault(fullname, importer)
        return None

    def find_distributions(self, context: Any = None) -> Iterable[Any]:
        found = importlib.machinery.PathFinder.find_distributions(context or _default_context())
        if self.importer() not in self.checked:
            return found
        return (d for d in found if canonical(d.metadata["Name"] or "") in self.allowed)

    def invalidate_caches(self) -> None:
        importlib.machinery.PathFinder.invalidate_caches()


def _default_context() -> Any:
    return importlib.metadata.DistributionFinder.Context()


def install() -> DeviceImports:
    """Puts the guard in place of the path finder; lists what it hid on stderr at exit."""
    carried = set(carried_wheels())
    guard = DeviceImports(set(device_packages()) | carried, carried)
    at = sys.meta_path.index(importlib.machinery.PathFinder)
    sys.meta_path[at] = guard  # type: ignore[call-overload]

    def report() -> None:
        for name, importer in sorted(guard.hidden.items()):
            print(f"device_imports: hid {name} from {importer}", file=sys.stderr)

    atexit.register(report)
    return guard


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: device_imports.py SCRIPT [ARGS...]")
    install()
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(ROOT))
    runpy.run_path(sys.argv[0], run_name="__main__")
