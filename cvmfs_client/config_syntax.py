"""The shell subset CernVM-FS configuration files are written in, read without running a
shell: `KEY=VALUE` lines with quoting, comments, `export` and `$NAME` expansion.

CernVM-FS sources these files with /bin/sh; a line that needs a real shell (`if`,
command substitution, arithmetic, an unquoted `;`) is refused with its file and line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cvmfs_client.errors import ClientError

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)
# Characters that make a line a shell command rather than an assignment when unquoted.
_SHELL_OPERATORS = set(";|&<>()`")


class ConfigError(ClientError):
    """A configuration file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Origin:
    """Where a value was set."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Assignment:
    key: str
    value: str
    origin: Origin


def parse_assignments(
    text: str, source: str, variables: Mapping[str, str] | None = None
) -> list[Assignment]:
    """The assignments of one file, in order. `$NAME` and `${NAME}` expand to what an
    earlier line (of this file or of `variables`, the files read before) set, else to
    the environment's value, else to nothing, as /bin/sh does."""
    known = dict(variables or {})
    found: list[Assignment] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        origin = Origin(source, number)
        words = _Line(raw, origin, known).words()
        if words and words[0] == "export":
            words = words[1:]
            if all(NAME.fullmatch(w) for w in words):
                continue  # `export NAME`: every setting is exported anyway
        if not words:
            continue
        for index, word in enumerate(words):
            match = _ASSIGNMENT.fullmatch(word)
            if match is None:
                if index == 0:
                    raise _not_an_assignment(raw, origin)
                raise ConfigError(
                    f"{origin}: {found[-1].key} needs exactly one value (quote it if it has spaces)"
                )
            assignment = Assignment(match[1], match[2], origin)
            found.append(assignment)
            known[assignment.key] = assignment.value
    return found


def _not_an_assignment(raw: str, origin: Origin) -> ConfigError:
    return ConfigError(
        f"{origin}: expected KEY=VALUE, got {raw.strip()!r} (cvmfs-client reads "
        "assignments, not shell commands)"
    )


class _Line:
    """Splits one line into words as sh does for assignments: quotes removed, variables
    expanded (and not split again), a comment ends the line."""

    def __init__(self, raw: str, origin: Origin, known: Mapping[str, str]):
        self.raw = raw
        self.origin = origin
        self.known = known
        key, equals, _ = raw.strip().removeprefix("export ").strip().partition("=")
        self.key = key if equals and NAME.fullmatch(key) else None
        self.where = f"{origin}: {key}" if self.key else str(origin)

    def fail(self, what: str) -> ConfigError:
        return ConfigError(f"{self.where}: {what}")

    def words(self) -> list[str]:
        line, i, words = self.raw, 0, []
        word: str | None = None  # None: between words
        while i < len(line):
            c = line[i]
            if c in " \t":
                if word is not None:
                    words.append(word)
                    word = None
                i += 1
            elif c == "#" and word is None:
                break
            elif c == "'":
                end = line.find("'", i + 1)
                if end < 0:
                    raise self.fail("unterminated single quote")
                word, i = (word or "") + line[i + 1 : end], end + 1
            elif c == '"':
                text, i = self._double_quoted(i + 1)
                word = (word or "") + text
            elif c == "\\":
                if i + 1 == len(line):
                    raise self.fail("a line continuation (trailing \\) is not supported")
                word, i = (word or "") + line[i + 1], i + 2
            elif c == "$":
                text, i = self._expand(i)
                word = (word or "") + text
            elif c in _SHELL_OPERATORS:
                if self.key is None:
                    raise _not_an_assignment(line, self.origin)
                raise self.fail(
                    f"unquoted {c!r}: quote the value, e.g. KEY='a;b' (only assignments "
                    "are read, not shell commands)"
                )
            else:
                word, i = (word or "") + c, i + 1
        if word is not None:
            words.append(word)
        return words

    def _double_quoted(self, i: int) -> tuple[str, int]:
        line, text = self.raw, ""
        while i < len(line):
            c = line[i]
            if c == '"':
                return text, i + 1
            if c == "\\" and i + 1 < len(line) and line[i + 1] in '$`"\\':
                text, i = text + line[i + 1], i + 2
            elif c == "$":
                value, i = self._expand(i)
                text += value
            elif c == "`":
                raise self.fail("command substitution is not supported")
            else:
                text, i = text + c, i + 1
        raise self.fail("unterminated double quote")

    def _expand(self, i: int) -> tuple[str, int]:
        """The value of the variable whose `$` is at i, and the index after it."""
        line = self.raw
        rest = line[i + 1 :]
        if rest.startswith("("):
            raise self.fail("command substitution and shell arithmetic are not supported")
        if rest.startswith("{"):
            end = rest.find("}")
            name = rest[1:end] if end > 0 else ""
            if not NAME.fullmatch(name):
                raise self.fail(f"only ${{NAME}} is supported, not {line[i:].split()[0]!r}")
            return self._lookup(name), i + 1 + end + 1
        match = NAME.match(rest)
        if match is None:
            return "$", i + 1
        return self._lookup(match[0]), i + 1 + match.end()

    def _lookup(self, name: str) -> str:
        if name in self.known:
            return self.known[name]
        return os.environ.get(name, "")
