"""docker-compose.yml as compose reads it, without a Docker engine: a
service's environment with `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
`${VAR:?error}`, `${VAR?error}`, `${VAR:+alt}`, `$VAR` and `$$` resolved as
compose resolves them (https://docs.docker.com/compose/how-tos/environment-variables/variable-interpolation/).
tests/test_deploy.py holds the result against `docker-compose config`
where that tool is installed."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.support import ROOT

COMPOSE = ROOT / "docker-compose.yml"

_VARIABLE = re.compile(r"""
    \$(?:
        (?P<escaped>\$)
      | \{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}
      | (?P<named>[A-Za-z_][A-Za-z0-9_]*)
    )""", re.VERBOSE)


class Unset(Exception):
    """A `${VAR:?error}` whose variable is unset: compose refuses the file."""


def interpolate(value: str, variables: dict[str, str]) -> str:
    def one(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg = match["op"], match["arg"] or ""
        present = name in variables
        value = variables.get(name, "")
        empty = not value  # the ':' forms treat an empty value as unset
        if op in (":-", "-"):
            return arg if (empty if op == ":-" else not present) else value
        if op in (":?", "?"):
            if empty if op == ":?" else not present:
                raise Unset(f"{name}: {arg}")
            return value
        if op in (":+", "+"):
            return arg if (not empty if op == ":+" else present) else ""
        return value

    return _VARIABLE.sub(one, value)


def service_environment(service: str, *, variables: dict[str, str], path: Path = COMPOSE) -> dict[str, str]:
    """The environment compose gives `service`, with `variables` standing
    for the shell and the .env file."""
    environment = yaml.safe_load(path.read_text())["services"][service].get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: interpolate(str(value), variables) for key, value in environment.items()}
