"""Static checks of a Docker Compose file, without a Docker engine.

`validate` checks a compose file against the Compose specification's JSON Schema, vendored in
deploy/compose_spec/ (see its README for the source). `fedmri_commands` lists the `fedmri` command
lines each service runs, from its `entrypoint` and `command`, also inside `sh -c` scripts, so
that they can be checked against the CLI's parsers.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import yaml

SCHEMA = Path(__file__).resolve().parent / "compose_spec" / "compose-spec.json"
SHELLS = frozenset({"sh", "bash", "dash", "ash", "zsh"})
# Shell operators: the separators of simple commands (a newline too: see _words) and the
# redirections (dropped with their target).
_OPERATOR = re.compile(r"&&|\|\||;;|>>|>&|<&|&>|>\||[;&|()\n<>]")
_FD_NUMBER = re.compile(r"(?<![^\s;&|()])\d+(?=[<>])")
_SEPARATORS = frozenset({";", "&&", "||", "|", "&", "(", ")", "\n", ";;"})
# Words that may stand before a command without being the command.
_PREFIXES = frozenset({"exec", "then", "do", "else", "elif", "if", "while", "until", "!", "{"})


def validate(path: Path, schema_path: Path = SCHEMA) -> list[str]:
    """Errors of the compose file at `path` against the Compose specification, one readable
    line each (`$.services.web.ports: 5 is not of type 'array'`); empty when it is valid."""
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        return [f"{path}: not YAML: {err}"]
    if not isinstance(document, dict):
        return [f"{path}: a compose file is a mapping, not {type(document).__name__}"]
    schema = json.loads(schema_path.read_text())
    # The vendored copy says draft-07; a newer copy may say 2020-12: follow its $schema.
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    errors = sorted(cls(schema).iter_errors(document), key=lambda e: list(map(str, e.path)))
    return [_describe(error) for error in errors]


def _describe(error: jsonschema.ValidationError) -> str:
    message = error.message
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        schema = error.schema if isinstance(error.schema, dict) else {}
        known, patterns = schema.get("properties", {}), schema.get("patternProperties", {})
        extra = [key for key in error.instance
                 if key not in known and not any(re.search(p, key) for p in patterns)]
        message = f"unknown key{'s' * (len(extra) > 1)} {', '.join(map(repr, extra))}"
    line = f"{error.json_path}: {message}"
    if error.context:  # oneOf/anyOf: the alternative that came closest says more
        best = jsonschema.exceptions.best_match(error.context)
        if best is not None:
            line += f" (closest: {best.json_path}: {best.message})"
    return line


def fedmri_commands(compose: Mapping[str, Any], entrypoint: Sequence[str] = ("fedmri",)
                    ) -> list[tuple[str, list[str]]]:
    """(service, argv after `fedmri`) for every fedmri invocation of every service, in order.

    A service's argv is its `entrypoint` followed by its `command` or, without an
    `entrypoint`, the image's (`entrypoint`, default: our image's ["fedmri"]) followed by its
    `command`; a service with neither runs the image's default and is left out. Shell scripts
    (`sh -c SCRIPT`) are split into simple commands; `exec`, variable assignments and `env`
    before `fedmri` are skipped."""
    found: list[tuple[str, list[str]]] = []
    for name, service in (compose.get("services") or {}).items():
        own = _argv(service.get("entrypoint"))
        command = _argv(service.get("command"))
        if own is None and command is None:
            continue
        argv = (list(entrypoint) if own is None else own) + (command or [])
        found += [(name, found_argv) for found_argv in _invocations(argv)]
    return found


def _argv(value: Any) -> list[str] | None:
    """Compose's exec form (a list) as is; its string form split as Compose does (shell words,
    no shell)."""
    if value is None:
        return None
    if isinstance(value, str):
        return shlex.split(value)
    return [str(word) for word in value]


def _invocations(argv: list[str]) -> list[list[str]]:
    argv = _strip_prefixes(argv)
    if not argv:
        return []
    program = PurePosixPath(argv[0]).name
    if program == "fedmri":
        return [argv[1:]]
    if program in SHELLS:
        script = _shell_script(argv[1:])
        if script is not None:
            return [found for command in _commands(script) for found in _invocations(command)]
    return []


def _strip_prefixes(argv: list[str]) -> list[str]:
    """`exec`, `env`, `NAME=value` and shell keywords before the command itself."""
    i = 0
    while i < len(argv) and (argv[i] in _PREFIXES or argv[i] == "env" or _assignment(argv[i])):
        i += 1
    return argv[i:]


def _assignment(word: str) -> bool:
    name, eq, _ = word.partition("=")
    return bool(eq) and name.isidentifier()


def _shell_script(args: list[str]) -> str | None:
    """The SCRIPT of `sh [options] -c SCRIPT [name [args...]]`, or None without -c."""
    has_c = False
    i = 0
    while i < len(args) and args[i][:1] in ("-", "+") and args[i] not in ("-", "--"):
        flags = "" if args[i].startswith("--") else args[i][1:]
        has_c = has_c or "c" in flags
        i += 1 + flags.count("o")  # -o OPTION, also in a cluster (-euo pipefail)
    if args[i:i + 1] == ["--"]:
        i += 1
    return args[i] if has_c and i < len(args) else None


def _commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script: split on ; && || | & ( ) and newlines, comments
    and redirections left out. $VAR stays as written; $(...) is a command of its own."""
    commands: list[list[str]] = [[]]
    in_comment = redirect = False
    for word in _words(script):
        if word == "\n":
            in_comment = False
        if in_comment:
            continue
        if word in _SEPARATORS:
            commands.append([])
        elif _OPERATOR.fullmatch(word):  # a redirection: its target follows
            redirect = True
        elif redirect:
            redirect = False
        elif word.startswith("#"):
            in_comment = True
        else:
            commands[-1].append(word)
    return [command for command in commands if command]


def _words(script: str) -> list[str]:
    """Shell words and operators; shlex joins adjacent operator characters (`)\\n`, `;;&&`),
    which are split here."""
    script = _FD_NUMBER.sub("", script)  # the 2 of 2>&1
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|()<>\n")
    lexer.whitespace = " \t\r"  # a newline ends a command: a token of its own
    lexer.whitespace_split = True
    lexer.commenters = ""  # comments are found in _commands, where a newline ends them
    words: list[str] = []
    for token in lexer:
        parts = _OPERATOR.findall(token)
        words += parts if "".join(parts) == token else [token]
    return words
