"""No import circles in src/: each part of tunelab can be read, tested and changed from the bottom up, since a lower
module never reaches up for a name (import-linter's contract in pyproject.toml)."""

import grimp
from importlinter.cli import lint_imports

from tests.conftest import ROOT


def test_no_two_modules_or_packages_of_tunelab_import_each_other(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    failed = lint_imports(config_filename="pyproject.toml", no_cache=True, no_logo=True)
    assert failed == 0, capsys.readouterr().out


def test_the_config_error_is_importable_from_anywhere_in_tunelab():
    # tunelab.errors holds ConfigError, which every part raises: one import of tunelab there and some part would
    # import in a circle through it.
    imported = grimp.build_graph("tunelab").find_modules_directly_imported_by("tunelab.errors")
    assert not imported
