"""The layout's rules (docs/design.md): the client never reaches the server's code, each concept is defined once."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Modules only the server (or a tool) may import; ``strategies`` is the server's algorithm package.
SERVER_ONLY = ("strategies", "atlas_flwr.server_app", "atlas_flwr.server", "atlas_flwr.server.split_server", "atlas_flwr.server.shapes",
               "atlas_flwr.server.preflight", "atlas_tools", "atlas_flwr.eurosat.server")  # fmt: skip


def _module_path(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if _module_path(f"{node.module}.{a.name}")}
    return {m for m in out if m.split(".")[0] in ("atlas_flwr", "strategies", "atlas_tools")}


def test_nothing_the_client_app_reaches_is_server_code() -> None:
    seen, todo, via = set(), ["atlas_flwr.client_app"], {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_path(name)
        for dep in _imports(path) if path else ():
            via.setdefault(dep, name)
            todo.append(dep)
    bad = sorted(m for m in seen if m.startswith(SERVER_ONLY))
    assert not bad, f"the ClientApp reaches {bad[0]} (imported by {via[bad[0]]})"
    assert (
        "atlas_flwr.common.state" in seen and "atlas_flwr.client.local" in seen
    )  # the walk does reach the client's code


def test_shared_concepts_are_defined_once() -> None:
    names = {"State": [], "LORA_A_SUFFIX": [], "DeviceProfile": [], "parse_size": [], "module_ranks": []}
    for path in [*ROOT.glob("atlas_flwr/**/*.py"), *ROOT.glob("strategies/*.py")]:
        for node in ast.parse(path.read_text()).body:
            targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            defined = getattr(node, "name", None) or (node.target.id if isinstance(node, ast.AnnAssign) else None)
            for name in [*targets, defined]:
                if name in names:
                    names[name].append(str(path.relative_to(ROOT)))
    assert {k: len(v) for k, v in names.items()} == dict.fromkeys(names, 1), names
    assert names["State"] == ["atlas_flwr/common/state.py"] and names["DeviceProfile"] == [
        "atlas_flwr/common/devices.py"
    ]


def test_the_flower_apps_are_thin_glue() -> None:
    for name in ("server_app.py", "client_app.py"):
        lines = len((ROOT / "atlas_flwr" / name).read_text().splitlines())
        assert lines <= 150, f"atlas_flwr/{name} has {lines} lines: move logic into the server/ or client/ rooms"


def test_the_app_bundle_never_imports_the_tools() -> None:
    """The FAB carries atlas_flwr/ and strategies/ only (fab-include): an import of atlas_tools would fail on a
    SuperNode."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["fab-include"]
    assert sorted(include) == ["atlas_flwr/**/*.py", "strategies/**/*.py"]
    for path in [*ROOT.glob("atlas_flwr/**/*.py"), *ROOT.glob("strategies/*.py")]:
        tools = sorted(m for m in _imports(path) if m.startswith("atlas_tools"))
        assert not tools, f"{path.relative_to(ROOT)} imports {tools[0]}, which the FAB does not carry"


def test_a_newcomer_finds_install_run_and_test_at_the_top_of_a_short_readme() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines: move detail into docs/"
    heads = {line: i for i, line in enumerate(lines) if line.startswith("## ")}
    assert heads["## Install"] < heads["## Run the default experiment (offline)"] < heads["## Test"]
    assert lines.index("pytest -q") < 80, "the test command must appear before line 80"


def test_common_code_depends_on_neither_side() -> None:
    for path in ROOT.glob("atlas_flwr/common/*.py"):
        sides = sorted(
            m for m in _imports(path) if m.startswith(("strategies", "atlas_flwr.server", "atlas_flwr.client"))
        )
        assert not sides, f"{path.relative_to(ROOT)} imports {sides[0]}: common/ is what both sides use"
