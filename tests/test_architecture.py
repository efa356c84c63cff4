"""The package's layout holds: who may import whom (docs/design.md draws it), module sizes,
and help text, epilogs and docstrings that list keys or defaults agree with the code."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from moglstm import cli
from moglstm.cli import evaluate as evaluate_command
from moglstm.cli import train as train_command
from moglstm.lm.config import CONFIG_VERSION, TrainConfig
from moglstm.lm.dynamic_eval import DynamicEvalSettings
from moglstm.lm.errors import UserError
from moglstm.lm.runs import checkpoint
from moglstm.lm.runs.folder import RESUMABLE_KEYS
from moglstm.lm.runs.payload import PAYLOAD_KEYS, CheckpointPayload

SRC = Path(cli.__file__).resolve().parent.parent  # src/moglstm
README = (SRC.parents[1] / "README.md").read_text("utf-8")

# Who may import whom at module level (imports inside functions, made to break a cycle
# or to load an optional part late, are not counted). Keys and values are parts of the
# package: "nn", "benchmark", "cli", or "lm.<module or subpackage>".
ALLOWED = {
    "lm": set(),  # the package's __init__: nothing
    "nn": set(),
    "benchmark": {"nn"},
    "cli": {"benchmark", "lm.*"},
    "lm.errors": set(),
    "lm.arguments": set(),
    "lm.safety": {"lm.errors"},
    "lm.state": set(),
    "lm.layers": {"lm.arguments"},
    "lm.runtime": {"lm.errors", "lm.safety"},
    "lm.stopping": {"lm.errors"},
    "lm.policies": set(),
    "lm.metrics": {"lm.safety"},
    "lm.progress": set(),
    "lm.runlock": {"lm.errors", "lm.safety"},
    "lm.budget": {"lm.errors", "lm.safety"},
    "lm.data": {"lm.arguments", "lm.errors", "lm.safety"},
    "lm.config": {"lm.data", "lm.errors", "lm.layers", "lm.models", "lm.policies",
                  "lm.runtime", "lm.safety", "nn"},
    "lm.models": {"lm.arguments", "lm.budget", "lm.errors", "lm.layers", "lm.state", "nn"},
    "lm.regularize": {"lm.arguments", "lm.errors", "lm.layers", "lm.state", "nn"},
    "lm.runs": {"lm.config", "lm.data", "lm.errors", "lm.models", "lm.runtime", "lm.safety"},
    "lm.dynamic_eval": {"lm.data", "lm.errors", "lm.models", "lm.progress", "lm.state"},
    "lm.distributed": {"lm.errors", "lm.runtime", "lm.safety", "lm.state"},
    "lm.evaluate": {"lm.data", "lm.dynamic_eval", "lm.errors", "lm.metrics", "lm.models",
                    "lm.progress", "lm.regularize", "lm.runs", "lm.runtime", "lm.state"},
    "lm.generate": {"lm.data", "lm.errors", "lm.runs", "lm.safety"},
    "lm.report": {"lm.errors", "lm.runs", "lm.safety"},
    "lm.train": {"lm.budget", "lm.config", "lm.data", "lm.distributed", "lm.evaluate",
                 "lm.metrics", "lm.models", "lm.policies", "lm.regularize", "lm.runlock",
                 "lm.runs", "lm.runtime", "lm.safety", "lm.state", "lm.stopping"},
    "lm.tune": {"lm.config", "lm.errors", "lm.safety", "lm.stopping"},
}  # fmt: skip
# the torch-only layers: nothing but torch (and the standard library) at module level
TORCH_ONLY = ("lm.layers", "lm.state", "lm.policies")
# modules allowed past ~600 lines, each saying why in its opening docstring
MAX_LINES = 600


def _part(module: str) -> str:
    parts = module.split(".")
    return f"lm.{parts[2]}" if len(parts) > 2 and parts[1] == "lm" else parts[1]


def _module_imports(path: Path) -> set[str]:
    """The moglstm modules ``path`` imports at module level (not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text("utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moglstm"):
            if node.module in ("moglstm.lm", "moglstm.cli"):
                found |= {f"{node.module}.{a.name}" for a in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("moglstm")}
    return found


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        if len(parts) > 1 and parts[1] != "__main__":
            out.append((".".join(parts), path))
    return out


def test_every_part_imports_only_what_the_picture_allows():
    offenders = []
    for module, path in _modules():
        part = _part(module)
        allowed = ALLOWED.get(part)
        assert allowed is not None, f"{module}: add its part to ALLOWED and docs/design.md"
        for target in _module_imports(path):
            other = _part(target) if target != "moglstm" else "moglstm"
            if other in (part, "moglstm"):
                continue
            if other not in allowed and not ("lm.*" in allowed and other.startswith("lm.")):
                offenders.append(f"{module} imports {target}")
    assert not offenders, offenders


def test_torch_only_layers_import_nothing_else():
    for module, path in _modules():
        if _part(module) not in TORCH_ONLY:
            continue
        for node in ast.parse(path.read_text("utf-8")).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                root = (name or "").split(".")[0]
                assert root in ("__future__", "torch", "collections", "typing", "math",
                                "logging", "contextlib") or name == "moglstm.lm.arguments", (
                    f"{module} imports {name}"
                )  # fmt: skip


def test_the_design_picture_names_every_part():
    design = (SRC.parents[1] / "docs" / "design.md").read_text("utf-8")
    picture = design.split("## Package layout", 1)[1]
    for part in ALLOWED:
        name = part.removeprefix("lm.")
        assert re.search(rf"\b{re.escape(name)}\b", picture), part


def test_long_modules_say_why_in_their_opening_docstring():
    for module, path in _modules():
        text = path.read_text("utf-8")
        if text.count("\n") <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        assert "lines" in doc and "why" in doc.lower(), (
            f"{module} has {text.count(chr(10))} lines: say why in its docstring or split it"
        )


# --------------------------------------------------------------------------- facts written once


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_train_epilog_lists_every_key_that_may_change_on_resume():
    epilog = train_command.epilog()
    section = epilog.split("may be overridden when resuming:", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"[a-z_]+(?:\.[a-z_]+)*", section))
    assert listed == set(RESUMABLE_KEYS)
    assert f"train.dist_timeout seconds ({TrainConfig().dist_timeout:g})" in _flat(epilog)


def test_evaluate_epilog_and_options_give_the_dynamic_defaults():
    epilog = _flat(evaluate_command.epilog())
    args = cli.build_parser().parse_args(["evaluate", "RUN"])
    for key, value in dataclasses.asdict(DynamicEvalSettings()).items():
        shown = "all" if value is None else f"{value:g}"
        assert f"--dynamic-{key.replace('_', '-')} {shown}" in epilog
        assert getattr(args, f"dynamic_{key}") == value


def test_benchmark_epilog_shows_the_default_grid():
    from moglstm.benchmark import DEFAULT_GRID, parse_shape
    from moglstm.cli import benchmark as benchmark_command

    grid = _flat(benchmark_command.epilog()).split("The default grid: ", 1)[1].split(".")[0]
    base = parse_shape(grid.split(", ")[0].replace(" ", ","))
    shown = [base] + [
        parse_shape(",".join([*_spec_items(base), *spec.split()]))
        for spec in grid.split(", ")[1:]
    ]
    assert shown == list(DEFAULT_GRID)


def _spec_items(shape) -> list[str]:
    from moglstm.benchmark import shape_spec

    return shape_spec(shape).split()


def test_checkpoint_docstring_lists_every_payload_key():
    assert list(PAYLOAD_KEYS) == list(CheckpointPayload.__annotations__)
    doc = checkpoint.__doc__
    for key in PAYLOAD_KEYS:
        assert re.search(rf"^\s+{key}\s", doc, re.M), key


def test_readme_states_the_current_config_version():
    assert f"holds `version` (now {CONFIG_VERSION})" in _flat(README)


# --------------------------------------------------------------------------- user errors


def test_a_user_error_is_one_line_and_a_bug_shows_its_traceback(monkeypatch, capsys, tmp_path):
    code = cli.main(["train", "--out-dir", str(tmp_path), "model.hidden_size=0", "--print-config"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "model.hidden_size=0" in err

    def bug(*args, **kwargs):
        raise ValueError("an internal bug")  # a bare ValueError: not the user's doing

    monkeypatch.setattr(cli.presets_command, "list_presets", bug)
    with pytest.raises(ValueError, match="an internal bug"):  # propagates: a traceback
        cli.main(["presets"])
    assert issubclass(UserError, ValueError)  # library callers' `except ValueError` still works


# --------------------------------------------------------------------------- the checkout


def test_no_source_or_test_file_is_ignored_by_git():
    """A package folder matched by a .gitignore pattern (a run folder's `runs/`) would be left
    out of every commit and missing from a clean checkout."""
    root = SRC.parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(p.relative_to(root)) for d in ("src", "tests") for p in (root / d).rglob("*.py")]
    found = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin"],
        cwd=root, input="\n".join(files), capture_output=True, text=True,
    )
    assert found.stdout.split() == []
