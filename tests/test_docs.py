"""The docs stay true: the README's set-up commands, its configuration table (the settings' own names,\ndefaults, rules and descriptions), no commit ids, no cited results file missing, and the command's help."""

from __future__ import annotations

import re

import pytest

from core.settings import Settings, rule
from sentiment.cli import _parser
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


TABLE_HEADER = "| variable | default | rule | meaning |\n| --- | --- | --- | --- |\n"


def configuration_table() -> str:
    """The README's configuration table, made from `Settings.model_fields`: name, default, rule, description.

    The settings' descriptions are the one description of each knob. After changing a setting,
    regenerate the table and paste it over the README's:

        python -c "from tests.test_docs import configuration_table as t; print(t(), end='')"
    """
    rows, defaults = [], {}  # a default computed from other settings is shown as computed from theirs
    for name, field in Settings.model_fields.items():
        defaults[name] = field.get_default(call_default_factory=True, validated_data=defaults)
        shown = "unset" if defaults[name] is None else f"`{defaults[name]}`"
        description = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `SENTIMENT_{name.upper()}` | {shown} | {rule(name)} | {description} |\n")
    return TABLE_HEADER + "".join(rows)


def test_configuration_table_is_the_settings_names_defaults_and_descriptions() -> None:
    start = README.index(TABLE_HEADER)
    end = README.find("\n\n", start)
    shown = README[start : end + 1 if end != -1 else len(README)]
    assert shown == configuration_table(), (
        "README's configuration table disagrees with core/settings.py; regenerate it "
        "(tests/test_docs.py, configuration_table's docstring)"
    )


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_docs_cite_no_commit_ids_and_exactly_the_results_files_kept() -> None:
    cited_files: set[str] = set()
    for doc in DOCS:
        text = doc.read_text()
        assert not re.findall(r"\b[0-9a-f]{7,40}\b", text), f"{doc.name} names a commit: readers cannot see it"
        for cited in re.findall(r"\]\((?:\.\./)?benchmarks/results/([^)]+)\)", text):
            assert (REPO / "benchmarks" / "results" / cited).is_file(), f"{doc.name} cites a missing {cited}"
            cited_files.add(cited)
    # Only the cited runs (the latest per machine kind) stay in the tree; older ones live in git history.
    kept = {p.name for p in (REPO / "benchmarks" / "results").iterdir() if "quick" not in p.name}
    assert kept <= cited_files, (
        f"uncited results files: delete them (docs/performance.md): {sorted(kept - cited_files)}"
    )


def test_readme_starts_with_the_install_and_serve_command_the_test_command_and_a_restart() -> None:
    blocks = [block.strip() for block in re.findall(r"```bash[^\n]*\n(.*?)```", README, flags=re.DOTALL)]
    install_and_serve, tests, restart = blocks[:3]
    assert "\n" not in install_and_serve, "one command to copy"
    steps = install_and_serve.split(" && ")
    assert steps[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"]
    assert steps[-1].endswith(" sentiment serve")
    assert tests == ". .venv/bin/activate && .ci/test"
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
    assert ci.rstrip().endswith("\n.ci/test"), "CI runs the README's test command"
    assert re.search(r'\nexec pytest [^\n]*"\$@"$', (REPO / ".ci" / "test").read_text().rstrip()), "pytest, as given"


def help_of(*command: str, capsys: pytest.CaptureFixture[str]) -> str:
    """What `sentiment COMMAND --help` prints."""
    with pytest.raises(SystemExit):
        _parser(Settings(_env_file=None)).parse_args([*command, "--help"])
    return capsys.readouterr().out


def test_sentiment_help_sums_up_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    summary, commands = help_of(capsys=capsys).split("positional arguments:")
    listed = re.findall(r"^    (\S+)", commands.split("options:")[0], re.M)
    assert {"serve", "chaos"} <= set(listed)
    summed_up = re.findall(r"[\w-]+", re.sub(r"-\n", "-", summary.split("\n\n", 1)[1]))  # (wrapped at hyphens)
    assert [name for name in listed if name not in summed_up] == []


def test_serve_help_says_what_it_starts_and_where_the_settings_are(capsys: pytest.CaptureFixture[str]) -> None:
    description = help_of("serve", capsys=capsys).split("\n\n")[1]
    assert " ".join(description.split()).startswith("Start the whole service on this machine: ")
    assert "SENTIMENT_MODEL_DIR" in description
    assert "the README's configuration table" in " ".join(description.split())
