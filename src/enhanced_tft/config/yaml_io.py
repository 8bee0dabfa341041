"""YAML in and out for configs: safe loading (no aliases, floats like 1e-3 read as floats) and dumping that
writes every value out (no anchors), so that what `etft` writes it can read back."""
from __future__ import annotations

import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """Safe YAML, plus floats written without a dot (1e-3): PyYAML's YAML 1.1 rules read those as strings.

    Aliases (*name) are refused: a config has no use for them, and a few hundred bytes of nested aliases
    ("billion laughs") expand to gigabytes when the value is validated or quoted in an error message.
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases (*{event.anchor}) are not allowed in a config; write the value out",
                event.start_mark)
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""),
    list("-+0123456789"))


def load_yaml_text(text: str) -> Any:
    """Parse YAML text; yaml.YAMLError for bad syntax or an alias."""
    return yaml.load(text, Loader=_Loader)


class _Dumper(yaml.SafeDumper):
    """Writes every value out: an object met twice would otherwise become an alias, which _Loader refuses."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)
