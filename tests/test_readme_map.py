"""The README's "Where each name lives" table names every registered strategy and plugin and the file
that really defines it, and every file it mentions exists."""

import inspect
import re
from pathlib import Path

from fedsim.catalog import registries

ROOT = Path(__file__).resolve().parent.parent


def _table() -> list[tuple[list[str], str, str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Where each name lives", 1)[1].split("\n\n|", 1)[1]
    rows = []
    for line in ("|" + section).splitlines():
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("name", "---"):
            continue
        rows.append((re.findall(r"`([^`]+)`", cells[0]), cells[1], cells[2].strip("`"), cells[3]))
    return rows


def test_every_registered_name_is_in_the_table_with_its_file():
    rows = _table()
    kinds = {"strategy": registries()["strategies"], "plugin": registries()["plugins"]}
    listed = {(kind, n): path for names, kind, path, _ in rows for n in names}
    for kind, reg in kinds.items():
        for name, obj in reg.items():
            where = Path(inspect.getsourcefile(obj)).resolve().relative_to(ROOT)
            if where.parts[0] == "tests":
                continue  # registered by a test module (e.g. a plugin that counts rounds)
            assert (kind, name) in listed, f"README table lacks the {kind} '{name}'"
            assert str(where) == listed[(kind, name)], f"{kind} '{name}' lives in {where}"


def test_every_file_the_table_mentions_exists():
    for _, _, path, extra in _table():
        for p in [path, *re.findall(r"`([\w/]+\.py)`", extra)]:
            assert (ROOT / p).exists() or (ROOT / "strategies" / p).exists(), p
