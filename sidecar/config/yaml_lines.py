"""Read YAML the way a config error needs it: plain data, plus the line of every key and item.

`${VAR}` and `${VAR:-default}` are replaced from the environment inside string scalars. A referenced
but unset variable is an error (an empty secret must never pass for a configured one).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

Loc = tuple[str | int, ...]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")


class ConfigError(Exception):
    """One or more problems in a configuration file, each as `FILE:LINE: place: message`, in line order."""

    def __init__(self, errors: list[str]) -> None:
        errors = sorted(errors, key=_line)  # stable: problems on one line keep the order they were found in
        super().__init__("\n".join(errors))
        self.errors = errors


def _line(error: str) -> int:
    match = _LINE.search(error)
    return int(match.group(1)) if match else 0


_LINE = re.compile(r":(\d+): ")  # the first `:LINE: ` after the file name


def place(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top)"


class YamlDocument:
    """The parsed data and a table from location to line number."""

    def __init__(self, text: str, filename: str, env: Mapping[str, str]) -> None:
        self.filename = filename
        self.lines: dict[Loc, int] = {}
        self.errors: list[str] = []
        self.unset: set[Loc] = set()  # where an unset ${VAR} was replaced by "": checks there would only repeat it
        self._env = env
        self._constructor = yaml.SafeLoader("")
        self.data: Any = None
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            self.data = self._build(node, ()) if node is not None else None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark else 1
            problem = getattr(exc, "problem", None) or str(exc)
            fix = "fix the YAML syntax"
            if "${" in (text.splitlines()[line - 1:line] or [""])[0]:  # `{token: ${VAR}}`: the } ends the mapping
                fix = 'quote a ${VAR} inside { } or [ ], as "${VAR}"'
            self.errors.append(f"{filename}:{line}: (yaml): {problem}; {fix}")
        except RecursionError:
            self.errors.append(f"{filename}:1: (yaml): the document is nested too deeply; flatten it")

    def line_of(self, loc: Loc) -> int:
        """The line of the deepest known location along `loc` (unknown parts, like union tags, are skipped)."""
        known: Loc = ()
        line = self.lines.get((), 1)
        for part in loc:
            candidate = (*known, part)
            if candidate in self.lines:
                known = candidate
                line = self.lines[candidate]
        return line

    def known_loc(self, loc: Loc) -> Loc:
        known: Loc = ()
        for part in loc:
            if (*known, part) in self.lines:
                known = (*known, part)
        return known

    def error(self, loc: Loc, message: str) -> str:
        return f"{self.filename}:{self.line_of(loc)}: {place(self.known_loc(loc))}: {message}"

    def came_from_unset(self, loc: Loc) -> bool:
        return any(loc[:len(unset)] == unset for unset in self.unset)

    def _build(self, node: yaml.Node, loc: Loc) -> Any:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self._build(key_node, (*loc, "(key)")) if not isinstance(key_node, yaml.ScalarNode) else (
                    self._scalar(key_node, loc))
                if not isinstance(key, str | int):
                    key = str(key)
                if key in result:
                    line = key_node.start_mark.line + 1
                    self.errors.append(f"{self.filename}:{line}: {place((*loc, key))}: duplicate key; keep only one")
                self.lines[(*loc, key)] = key_node.start_mark.line + 1
                result[key] = self._build(value_node, (*loc, key))
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self._build(item, (*loc, i)) for i, item in enumerate(node.value)]
        try:
            value = self._constructor.construct_object(node)
        except (ValueError, TypeError, IndexError, OverflowError):
            # Scalars that look typed but are not (a timestamp with month 13, a bad !!float): say where.
            self.errors.append(f"{self.filename}:{node.start_mark.line + 1}: {place(loc)}: {node.value!r} cannot be "
                               "read as the type its form or tag says; quote it to make it a string")
            return None
        if isinstance(value, str) and "${" in value:
            value = self._substitute(value, loc, node.start_mark.line + 1)
        return value

    def _scalar(self, node: yaml.ScalarNode, loc: Loc) -> Any:
        try:
            return self._constructor.construct_object(node)
        except (ValueError, TypeError, IndexError, OverflowError, yaml.YAMLError):
            self.errors.append(f"{self.filename}:{node.start_mark.line + 1}: {place(loc)}: the key {node.value!r} "
                               "cannot be read; quote it")
            return node.value

    def _substitute(self, value: str, loc: Loc, line: int) -> str:
        def replace(match: re.Match[str]) -> str:
            name, has_default, default = match.group(1), match.group(2), match.group(3)
            if name in self._env:
                return self._env[name]
            if has_default is not None:
                return default or ""
            self.unset.add(loc)
            self.errors.append(
                f"{self.filename}:{line}: {place(loc)}: environment variable {name} is not set; "
                f"export {name}, or write ${{{name}:-default}} to make it optional"
            )
            return ""

        return _VAR.sub(replace, value)
