"""The README stays true: its set-up commands, and a configuration table naming every setting."""

from __future__ import annotations

import re

from sentiment.settings import Settings
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_configuration_table_lists_every_setting_with_its_default() -> None:
    rows = dict(re.findall(r"^\| `(SENTIMENT_[A-Z_0-9]+)` \| ([^|]+) \|", README, flags=re.MULTILINE))
    assert set(rows) == {f"SENTIMENT_{name.upper()}" for name in Settings.model_fields}
    defaults: dict[str, object] = {}  # a default computed from other settings is shown as computed from theirs
    for name, field in Settings.model_fields.items():
        defaults[name] = field.get_default(call_default_factory=True, validated_data=defaults)
        shown = rows[f"SENTIMENT_{name.upper()}"].strip()
        assert shown == ("unset" if defaults[name] is None else f"`{defaults[name]}`"), name


def test_readme_starts_with_the_install_and_serve_command_then_the_test_command() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    install_and_serve, tests = blocks[0].strip(), blocks[1].strip()
    assert "pip install torch==2.13.0" in install_and_serve and install_and_serve.endswith("sentiment serve")
    assert tests.endswith("pytest")
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install -q torch==2.13.0" in ci and ci.rstrip().endswith("pytest")
