"""The README stays true to the code: the generated settings table is current, every trainer is
listed with a link to its source, and no link leaves the repository."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

from versemi.training.settings_table import BEGIN, END, settings_table, with_current_table
from versemi.training.trainers import discover_trainers

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LINK = re.compile(r"\]\(([^)#]+)(#[^)]*)?\)")


def test_the_settings_table_is_the_generated_one():
    text = README.read_text(encoding="utf-8")
    assert with_current_table(text) == text, "run: python -m versemi.training.settings_table README.md"
    assert "| `VerSemiTrainer` | `stage1_fraction` 0.3," in settings_table()


def test_regenerating_replaces_only_the_table():
    stale = f"before\n{BEGIN}\n| old | table |\n{END}\nafter\n"
    assert with_current_table(stale) == f"before\n{BEGIN}\n{settings_table()}\n{END}\nafter\n"


def test_every_trainer_is_listed_with_a_link_to_its_source():
    trainers, broken = discover_trainers()
    assert not broken
    text = README.read_text(encoding="utf-8")
    for name, trainer in trainers.items():
        if name == "Trainer":  # the base class, listed as SupervisedTrainer
            continue
        source = Path(inspect.getsourcefile(trainer)).relative_to(REPO).as_posix()
        assert f"| [`{name}`]({source})" in text, name


def test_every_link_stays_inside_the_repository_and_exists():
    for document in (README, REPO / "docs" / "method.md"):
        for target, _ in LINK.findall(document.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target):
                continue
            path = (document.parent / target).resolve()
            assert path.is_relative_to(REPO) and path.exists(), f"{document.name}: {target}"


def test_the_first_screen_shows_how_to_run_the_demo_and_the_tests():
    first_screen = "\n".join(README.read_text(encoding="utf-8").splitlines()[:25])
    for command in ("make demo", "make test ", "make test-all"):
        assert command in first_screen, command
