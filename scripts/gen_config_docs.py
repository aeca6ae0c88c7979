"""Generate the README's configuration reference from the settings and training-config models.

    python scripts/gen_config_docs.py          # rewrite README.md between the markers
    python scripts/gen_config_docs.py --check  # exit 1 if README.md is out of date (a test runs this)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _default(info) -> str:
    from pydantic_core import PydanticUndefined

    d = info.default
    if d is PydanticUndefined:
        if info.default_factory is not None:
            d = info.default_factory()
        else:
            return "(required)"
    return f"`{d!r}`" if not isinstance(d, str) else f"`{d}`"


def _type(info) -> str:
    t = info.annotation
    s = getattr(t, "__name__", None) if getattr(t, "__args__", None) is None else None
    s = s or str(t).replace("typing.", "")
    return s.replace("|", "\\|")


def train_table() -> str:
    from training.config import DEFAULT_CONFIG, flat_fields, load_config

    recipe = load_config(DEFAULT_CONFIG).model_dump(mode="json")

    def in_recipe(name: str) -> str:
        v = recipe
        for part in name.split("."):
            v = v[part]
        return f"`{v}`" if v is not None else "`null`"

    lines = ["| field (YAML `section.field`, CLI `--section.field`) | type | default recipe (`default.yaml`) | "
             "field default (absent from a YAML) | meaning |", "|---|---|---|---|---|"]
    for name, info in flat_fields().items():
        lines.append(f"| `{name}` | {_type(info)} | {in_recipe(name)} | {_default(info)} | "
                     f"{(info.description or '').replace('|', '/')} |")
    return "\n".join(lines)


def service_table() -> str:
    from service.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    lines = ["| environment variable | type | default | meaning |", "|---|---|---|---|"]
    for name, info in Settings.model_fields.items():
        lines.append(f"| `{prefix}{name.upper()}` | {_type(info)} | {_default(info)} | {(info.description or '').replace('|', '/')} |")
    return "\n".join(lines)


def render(text: str) -> str:
    for key, fn in (("train", train_table), ("service", service_table)):
        pat = re.compile(rf"(<!-- config:{key} -->\n).*?(<!-- /config:{key} -->)", re.S)
        if not pat.search(text):
            raise SystemExit(f"README.md lacks the <!-- config:{key} --> markers")
        text = pat.sub(lambda m: m.group(1) + fn() + "\n" + m.group(2), text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    old = README.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("README.md configuration reference is out of date: run python scripts/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
