"""What the lent H200 machine has (`gpu_device_packages.txt`) and what travels to it as wheels
(`gpu_wheels.txt`), and the check that the downloaded wheels need nothing beyond the two.

    python3 benchmarks/gpu_packages.py check .whl   # run by benchmarks/gpu_wheels.sh

The check reads each wheel's `Requires-Dist` (markers evaluated for CPython 3.12 on Linux x86_64,
extras left out) and fails when a requirement is neither carried nor on the device, or when its
version range excludes the carried or the device's known version. The machine has no network:
anything missing there is an ImportError in the middle of a 10-minute lease.
"""

from __future__ import annotations

import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEVICE_LIST = HERE / "gpu_device_packages.txt"
WHEELS_LIST = HERE / "gpu_wheels.txt"
# the device's interpreter, for the wheels' environment markers
DEVICE_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}
# Requires-Dist entries that are never imported on the device's Python, so they need not travel;
# tests/test_bench_gpu.py's import guard would fail the benchmark if one were imported after all.
UNUSED_REQUIREMENTS = {
    # diffusers/utils/import_utils.py imports importlib_metadata only on Python < 3.8
    ("diffusers", "importlib-metadata"),
}


def canonical(name: str) -> str:
    """PEP 503's normal form: `Pydantic_Core` and `pydantic-core` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_list(path: Path) -> dict[str, str | None]:
    """`name` or `name==version` per line (`#` comments) → {canonical name: version or None}."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        out[canonical(name.strip())] = version.strip() or None
    return out


def device_packages() -> dict[str, str | None]:
    return read_list(DEVICE_LIST)


def carried_wheels() -> dict[str, str | None]:
    return read_list(WHEELS_LIST)


def wheel_metadata(wheel: Path) -> tuple[str, str, list[str]]:
    """(canonical name, version, Requires-Dist lines) of one wheel file."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(archive.read(name).decode())
    return canonical(meta["Name"]), meta["Version"], meta.get_all("Requires-Dist") or []


def check(
    folder: Path,
    wanted: dict[str, str | None] | None = None,
    device: dict[str, str | None] | None = None,
) -> list[str]:
    """Problems with the wheels in `folder` (empty: they are complete and consistent), against
    `wanted` (default gpu_wheels.txt) and `device` (default gpu_device_packages.txt)."""
    from packaging.requirements import Requirement

    wanted = carried_wheels() if wanted is None else wanted
    device = device_packages() if device is None else device
    problems: list[str] = []
    found: dict[str, str] = {}
    requires: dict[str, list[str]] = {}
    for wheel in sorted(folder.glob("*.whl")):
        name, version, lines = wheel_metadata(wheel)
        if name in found:
            problems.append(f"two wheels of {name} ({found[name]}, {version}): pip stops on that")
        found[name] = version
        requires[name] = lines
    for name, version in wanted.items():
        if name not in found:
            problems.append(f"{name}=={version} is in gpu_wheels.txt but not in {folder}")
        elif version and found[name] != version:
            problems.append(f"{name}: {found[name]} in {folder}, gpu_wheels.txt pins {version}")
    problems += [
        f"{name} is in {folder} but not in gpu_wheels.txt" for name in found.keys() - wanted
    ]
    for name, lines in requires.items():
        for line in lines:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate(DEVICE_ENV):
                continue
            needed = canonical(requirement.name)
            if (name, needed) in UNUSED_REQUIREMENTS:
                continue
            have = found.get(needed) if needed in found else device.get(needed, "missing")
            if have == "missing":
                problems.append(f"{name} needs {line}: neither carried nor on the device")
            elif have is not None and not requirement.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {line}; the machine would have {needed} {have}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "check":
        print("usage: gpu_packages.py check WHEEL_FOLDER", file=sys.stderr)
        return 2
    problems = check(Path(argv[1]))
    for problem in problems:
        print(f"gpu_wheels: {problem}", file=sys.stderr)
    if not problems:
        print(f"gpu_wheels: {len(carried_wheels())} wheels, every Requires-Dist met")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
