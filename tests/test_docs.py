"""The README stays true: its set-up commands, and a configuration table naming every setting."""

from __future__ import annotations

import re

from core.settings import Settings
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


def test_readme_starts_with_the_install_and_serve_command_the_test_command_and_a_restart() -> None:
    blocks = [block.strip() for block in re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)]
    install_and_serve, tests, restart = blocks[:3]
    assert "\n" not in install_and_serve, "one command to copy"
    steps = install_and_serve.split(" && ")
    assert steps[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"]
    assert steps[-1].endswith(" sentiment serve")
    assert tests == ". .venv/bin/activate && pytest"
    assert restart == f". .venv/bin/activate && {steps[-1]}", "the same service, without the install"
    installs = [step for step in steps if step.startswith("pip install ")]
    assert installs[-1] == "pip install -e '.[dev]'"
    # Torch first, the worker image's version from its CPU-only index: from PyPI it is the CUDA build.
    image_args = dict(re.findall(r"^ARG (TORCH_\w+)=(\S+)$", (REPO / "Dockerfile.worker").read_text(), re.M))
    assert image_args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    torch = f"pip install --index-url {image_args['TORCH_INDEX_URL']} --retries 1 torch=={image_args['TORCH_VERSION']}"
    assert installs[0] == torch
    ci = (REPO / ".ci" / "run").read_text()
    for install in installs:  # CI installs as the README does, quietly
        assert install.replace("pip install ", "pip install -q ", 1) in ci.splitlines(), install
    assert ci.rstrip().endswith("\npytest")
