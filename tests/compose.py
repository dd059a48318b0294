"""docker-compose.yml read the way docker compose reads it, for tests that check it or run its
services' commands locally (no Docker engine on the test machines).

- `interpolate`: the Compose Specification's `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
  `${VAR:?error}`, `${VAR?error}`, `${VAR:+alt}`, `${VAR+alt}`, `$VAR` and `$$` (a literal `$`);
  defaults may nest (`${A:-${B:-b}}`).
- `read_env_file`: the `.env` format (KEY=VALUE lines, `#` comments, optional quotes).
- `load_compose`: the file with YAML merge keys resolved and every string interpolated.
- `service_environment`: what a container gets: its env_file, then its `environment`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

_NAME = re.compile(r"[A-Za-z_]\w*")
_BRACED = re.compile(r"(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.DOTALL)


class InterpolationError(ValueError):
    """A `${VAR:?message}` whose variable is unset (or empty), or a malformed reference."""


def _references(text: str) -> Iterator[tuple[int, int, str | None, str | None]]:
    """(start, end, name, braced body) of each reference in `text`; a `$$` has name None and
    body None. A braced body may hold nested references (`${A:-${B}}`), as docker compose allows."""
    i = 0
    while (i := text.find("$", i)) != -1:
        following = text[i + 1 : i + 2]
        if following == "$":
            yield i, i + 2, None, None
            i += 2
        elif following == "{":
            depth, j = 1, i + 2
            while j < len(text) and depth:
                if text.startswith("${", j):
                    depth, j = depth + 1, j + 2
                    continue
                depth -= text[j] == "}"
                j += 1
            if depth:
                raise InterpolationError(f"unclosed interpolation {text[i:]!r}")
            body = text[i + 2 : j - 1]
            braced = _BRACED.fullmatch(body)
            if braced is None:
                raise InterpolationError(f"invalid interpolation {text[i:j]!r}")
            yield i, j, braced.group("name"), body
            i = j
        elif named := _NAME.match(text, i + 1):
            yield i, named.end(), named.group(0), None
            i = named.end()
        else:
            i += 1


def _substitute(name: str, body: str | None, env: Mapping[str, str]) -> str:
    if body is None:
        return env.get(name, "")
    braced = _BRACED.fullmatch(body)
    assert braced is not None
    op, arg = braced.group("op"), braced.group("arg") or ""
    value = env.get(name)
    is_set, is_nonempty = value is not None, bool(value)
    present = is_nonempty if op and op.startswith(":") else is_set
    if op is None:
        return value or ""
    if op.endswith("-"):
        return value if present else interpolate(arg, env)  # type: ignore[return-value]
    if op.endswith("+"):
        return interpolate(arg, env) if present else ""
    if not present:  # `?`: required
        raise InterpolationError(f"{name}: {arg or 'required variable is missing'}")
    return value  # type: ignore[return-value]


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """`text` with every variable reference replaced from `env`, as docker compose does."""
    parts, last = [], 0
    for start, end, name, body in _references(text):
        parts.append(text[last:start])
        parts.append("$" if name is None else _substitute(name, body, env))
        last = end
    parts.append(text[last:])
    return "".join(parts)


def referenced_variables(text: str) -> set[str]:
    """Names of the variables `text` refers to, nested ones included (`$$` is not a reference)."""
    names = set()
    for _start, _end, name, body in _references(text):
        if name is None:
            continue
        names.add(name)
        if body is not None:
            braced = _BRACED.fullmatch(body)
            assert braced is not None
            names |= referenced_variables(braced.group("arg") or "")
    return names


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and `#` lines skipped; a `#` after whitespace starts a comment
    in an unquoted value; single or double quotes around a value are removed."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.removeprefix("export ").strip()
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key):
            raise ValueError(f"{path}:{number}: not KEY=VALUE: {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0]
        values[key] = value
    return values


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env) for key, value in node.items()}
    return node


def load_compose(env: Mapping[str, str] | None = None, path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The compose file as a dict: merge keys resolved; strings interpolated when `env` is given."""
    document = yaml.safe_load(path.read_text())
    return document if env is None else _interpolate_tree(document, env)


def _as_mapping(entries: Any) -> dict[str, str]:
    """`environment` in either form (mapping, or a list of KEY=VALUE) as a dict of strings."""
    if entries is None:
        return {}
    if isinstance(entries, dict):
        return {key: _env_value(value) for key, value in entries.items()}
    return dict(item.partition("=")[::2] for item in entries)


def _env_value(value: Any) -> str:
    """An `environment` mapping value as the container sees it (YAML booleans as true/false)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def env_file_paths(service: Mapping[str, Any]) -> list[str]:
    """The service's env_file paths, whatever form they are written in."""
    entries = service.get("env_file") or []
    entries = [entries] if isinstance(entries, (str, dict)) else entries
    return [entry if isinstance(entry, str) else entry["path"] for entry in entries]


def service_environment(
    service: Mapping[str, Any], env_files: Mapping[str, Mapping[str, str]]
) -> dict[str, str]:
    """The variables docker compose gives the service's container: its env_file entries (read
    from `env_files`, by path; a missing optional one is skipped), then its `environment`."""
    values: dict[str, str] = {}
    for path in env_file_paths(service):
        values.update(env_files.get(path, {}))
    values.update(_as_mapping(service.get("environment")))
    return values
