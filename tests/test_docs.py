"""The documentation: the configuration reference is current, links resolve, and every
Python block in docs/ runs.

A page's Python blocks run in order, in one module namespace, from a fresh temporary
directory. A block whose first line is `# not-run: <reason>` is skipped; that is for
fragments and for code that needs a server. Blocks may use Redis at
`redis://localhost:6379/0`: it is pointed at the test Redis, and the keys under the page's
`prefix` variable are deleted afterwards. A block (in any language) whose first line is
`# file: <name>` is written to that file in the directory instead, where later blocks can
import it; when a page has `test_*.py` files, pytest runs them there as a user would.

The site's navigation (mkdocs.yml) lists every page, and only pages that exist.
"""

import asyncio
import importlib.util
import inspect
import itertools
import os
import re
import subprocess
import sys
import types
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tests.storage.test_contract as store_contract
from tests.apps import quickstart_as_written
from tests.conftest import POSTGRES_URL

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
SPEC = ROOT.parent / "shared" / "spec" / "quickstart.md"
GENERATOR = ROOT / "scripts" / "gen_config_docs.py"

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
NOT_RUN = "# not-run:"
FILE = re.compile(r"# file: ([\w.-]+)\n")
MKDOCS = ROOT / "mkdocs.yml"
NAV_ENTRY = re.compile(r"^\s+- [^:\n]+: (\S+\.md)\s*$", re.M)

# The Quick Start's main.py is the user's code, kept byte for byte as in the spec; only its
# database URL is pointed at SQLite here (tests/test_quickstart.py runs it on PostgreSQL too).
QUICKSTART_URL = "postgresql+asyncpg://postgres:postgres@localhost/myapp"


def _ids(paths: list[Path]) -> list[str]:
    return [path.stem for path in paths]


def _without_code(text: str) -> str:
    """`text` without fenced blocks and inline code, where links and headings are not real."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _blocks(page: Path) -> Iterator[tuple[int, str, str]]:
    """(line number, language, code) of every fenced block of `page`."""
    text = page.read_text(encoding="utf-8")
    for match in FENCE.finditer(text):
        yield text.count("\n", 0, match.start()) + 1, match.group(1).strip(), match.group(2)


def _python_blocks(page: Path) -> list[tuple[int, str]]:
    return [(line, code) for line, language, code in _blocks(page) if language == "python"]


def _slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension gives a heading (its default slugify)."""
    text = unicodedata.normalize("NFKD", heading.replace("`", "")).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: Path) -> set[str]:
    # Inline code stays: a heading such as "## `RedisTenantStore`" has an anchor.
    return {_slug(heading) for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8")))}


def _load_generator() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config_docs", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the generated configuration reference ---------------------------------------------


def test_configuration_reference_is_up_to_date() -> None:
    stale = "docs/configuration.md is out of date: run python scripts/gen_config_docs.py"
    assert _load_generator().main(["--check"]) == 0, stale


def test_configuration_check_fails_on_a_stale_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    generator = _load_generator()
    output = tmp_path / "configuration.md"
    monkeypatch.setattr(generator, "OUTPUT", output)
    assert generator.main(["--check"]) == 1  # missing
    output.write_text(generator.render().replace("`TENANCY_CACHE_TTL`", "`TENANCY_CACHE`"))
    assert generator.main(["--check"]) == 1  # edited by hand
    assert generator.main([]) == 0
    assert generator.main(["--check"]) == 0
    assert "out of date" in capsys.readouterr().err


def test_configuration_reference_lists_every_field() -> None:
    from fastapi_tenancy import TenancyConfig

    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    for name, field in TenancyConfig.model_fields.items():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, name
        assert f"`TENANCY_{name.upper()}`" in row
        assert " ".join((field.description or "").split())[:40] in row


# -- links and code fences ---------------------------------------------------------------


@pytest.mark.parametrize("page", [*PAGES, ROOT / "README.md"], ids=[*_ids(PAGES), "README"])
def test_relative_links_resolve(page: Path) -> None:
    in_docs = page.parent == DOCS
    broken = []
    for target in LINK.findall(_without_code(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("//"):
            continue  # http:, https:, mailto: ...
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if in_docs:
            # mkdocs --strict: a page may link only to files inside docs/.
            if not (path.is_file() and path.is_relative_to(DOCS)):
                broken.append(target)
                continue
        elif not path.exists():
            broken.append(target)
            continue
        if anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def test_every_page_is_linked_from_the_index() -> None:
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    linked = {target.partition("#")[0] for target in LINK.findall(index)}
    assert {page.name for page in PAGES} - {"index.md"} <= linked


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_code_fences_name_their_language(page: Path) -> None:
    untagged = [line for line, language, _ in _blocks(page) if not language]
    assert not untagged, f"{page.name}: fences without a language on lines {untagged}"
    skipped = [(line, code) for line, code in _python_blocks(page) if code.startswith(NOT_RUN)]
    for line, code in skipped:
        reason = code.splitlines()[0].removeprefix(NOT_RUN).strip()
        assert reason, f"{page.name}:{line}: `# not-run:` needs a reason"


def test_quickstart_code_is_the_spec_verbatim() -> None:
    if not SPEC.exists():
        pytest.skip(f"the spec is not beside this checkout ({SPEC})")
    spec = [code for _, language, code in _blocks(SPEC) if language in ("python", "bash")]
    page = [code for _, language, code in _blocks(DOCS / "quickstart.md") if language in ("python", "bash")]
    assert [code for code in spec if code in page] == spec


# -- executing the Python blocks ---------------------------------------------------------


def _quickstart_main(code: str) -> str:
    if "class Order(Base)" in code:  # main.py
        assert QUICKSTART_URL in code
        return code.replace(QUICKSTART_URL, "sqlite:///app.db")
    return code


def _quickstart_ran(tmp_path: Path, output: str) -> None:
    assert "Created: acme-corp → schema: tenant_acme_corp" in output
    assert (tmp_path / "app.tenant_acme_corp.db").is_file()


# The Quick Start's seed.py imports `main`: its blocks run as a module of that name.
MODULE_NAMES = {"quickstart": "main"}
# Files a page's code imports without showing them: the Testing page tests the Quick
# Start's main.py as its page writes it (the database URL a literal it never reaches).
EXTRA_FILES: dict[str, Callable[[], dict[str, str]]] = {
    "testing": lambda: {"main.py": quickstart_as_written()}
}
REWRITES: dict[str, Callable[[str], str]] = {"quickstart": _quickstart_main}


def _clone_ran(_tmp_path: Path, output: str) -> None:
    # The clone has the source's rows, its own writes, and no provisioning step ran for it.
    assert output.splitlines()[-5:] == [
        "active Acme (staging)",
        "['free', 'pro']",
        "['ada@acme.test']",
        "['free', 'pro']",
        "[]",
    ], output


CHECKS: dict[str, Callable[[Path, str], None]] = {"quickstart": _quickstart_ran, "provisioning": _clone_ran}

EXECUTED = [page for page in PAGES if any(not code.startswith(NOT_RUN) for _, code in _python_blocks(page))]


def _files(page: Path) -> dict[str, str]:
    """The `# file: <name>` blocks of `page`: name -> content."""
    files = {}
    for _, _, code in _blocks(page):
        match = FILE.match(code)
        if match:
            files[match.group(1)] = code
    return files


WITH_TESTS = [page for page in PAGES if any(name.startswith("test_") for name in _files(page))]


DOCS_REDIS_URL = "redis://localhost:6379/0"


def _run_redis_page(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """`_exec_page` against the test Redis; the keys under the page's prefixes are deleted after."""
    from redis import Redis

    from tests.conftest import REDIS_URL, REQUIRE_SERVICES

    client = Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    try:
        client.ping()
    except Exception as exc:
        client.close()
        if REQUIRE_SERVICES:
            pytest.fail(f"Redis is required (TENANCY_TEST_REQUIRE_SERVICES=1): {exc}")
        pytest.skip(f"Redis not reachable: {exc}")
    name = MODULE_NAMES.get(page.stem, f"docs_{page.stem}")
    try:
        return _exec_page(page, tmp_path, monkeypatch, REDIS_URL)
    finally:
        # The page's module (in sys.modules until the test ends), even if a block failed.
        page_module = sys.modules.get(name)
        namespace = {} if page_module is None else page_module.__dict__
        prefix = namespace.get("prefix")
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000)) if prefix else []
        if keys:
            client.delete(*keys)
        client.close()


def _run_page(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run the page's Python blocks in order, in one module, from `tmp_path`; its namespace."""
    if any(DOCS_REDIS_URL in code for _, code in _python_blocks(page)):
        return _run_redis_page(page, tmp_path, monkeypatch)
    return _exec_page(page, tmp_path, monkeypatch)


def _exec_page(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str | None = None
) -> dict[str, Any]:
    monkeypatch.chdir(tmp_path)
    for name in [name for name in os.environ if name.upper().startswith("TENANCY_")]:
        monkeypatch.delenv(name)  # the examples show the defaults
    module = types.ModuleType(MODULE_NAMES.get(page.stem, f"docs_{page.stem}"))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    rewrite = REWRITES.get(page.stem, str)
    extra = EXTRA_FILES.get(page.stem, dict)()
    files = {**extra, **_files(page)}
    if files:
        monkeypatch.syspath_prepend(str(tmp_path))
        for name in files:  # the page's modules, imported from tmp_path only
            monkeypatch.delitem(sys.modules, name.removesuffix(".py"), raising=False)
    for name, code in extra.items():
        (tmp_path / name).write_text(code, encoding="utf-8")
    for line, code in _python_blocks(page):
        match = FILE.match(code)
        if match:
            (tmp_path / match.group(1)).write_text(code, encoding="utf-8")
            continue
        if code.startswith(NOT_RUN):
            continue
        if redis_url is not None:
            code = code.replace(DOCS_REDIS_URL, redis_url)
        # Line numbers in tracebacks point into the page.
        source = "\n" * line + rewrite(code)
        exec(compile(source, str(page), "exec"), module.__dict__)
    return module.__dict__


@pytest.mark.parametrize("page", EXECUTED, ids=_ids(EXECUTED))
def test_python_blocks_run(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _run_page(page, tmp_path, monkeypatch)
    check = CHECKS.get(page.stem)
    if check is not None:
        check(tmp_path, capsys.readouterr().out)


@pytest.mark.parametrize("page", WITH_TESTS, ids=_ids(WITH_TESTS))
def test_test_files_pass_under_pytest(page: Path, tmp_path: Path) -> None:
    files = _files(page)
    for name, code in {**EXTRA_FILES.get(page.stem, dict)(), **files}.items():
        (tmp_path / name).write_text(code, encoding="utf-8")
    # The PostgreSQL examples run too: they get the server the suite uses.
    env = {**os.environ, "TENANCY_TEST_POSTGRES_URL": POSTGRES_URL}
    env = {k: v for k, v in env.items() if not k.startswith("TENANCY_") or k == "TENANCY_TEST_POSTGRES_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout + result.stderr
    tests = sum(code.count("\nasync def test_") + code.count("\ndef test_") for code in files.values())
    assert re.fullmatch(rf"=+ {tests} passed in .*", summary), result.stdout


def test_the_site_navigation_lists_every_page() -> None:
    nav = NAV_ENTRY.findall(MKDOCS.read_text(encoding="utf-8"))
    assert len(nav) == len(set(nav)), "a page is in the nav twice"
    missing = sorted({page.name for page in PAGES} - set(nav))
    assert not missing, f"pages missing from the nav in mkdocs.yml: {missing}"
    assert set(nav) <= {page.name for page in PAGES}, "the nav names a page that does not exist"


def test_the_api_reference_covers_every_module() -> None:
    import pkgutil

    import fastapi_tenancy

    modules = {
        info.name
        for info in pkgutil.walk_packages(fastapi_tenancy.__path__, "fastapi_tenancy.")
        if not info.ispkg and not info.name.rpartition(".")[2].startswith("_")
    }
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: ([\w.]+)$", text, re.M))
    missing = sorted(m for m in modules if not any(d == m or d.startswith(m + ".") for d in documented))
    assert not missing, f"modules missing from docs/api.md: {missing}"
    assert "pytest_fastapi_tenancy" in documented


def test_most_python_blocks_run() -> None:
    blocks = [code for page in PAGES for _, code in _python_blocks(page)]
    skipped = [code for code in blocks if code.startswith(NOT_RUN)]
    assert len(skipped) * 5 <= len(blocks), f"{len(skipped)} of {len(blocks)} Python blocks are not run"


def _parametrisations(case: Callable[..., Any]) -> list[dict[str, Any]]:
    """The keyword arguments pytest would call `case` with, from its parametrize marks."""
    axes: list[list[dict[str, Any]]] = []
    for mark in getattr(case, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names, values = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        rows = [getattr(v, "values", v if len(names) > 1 else (v,)) for v in values]
        axes.append([dict(zip(names, row, strict=True)) for row in rows])
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]


def test_the_custom_store_example_passes_the_store_contract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_class = _run_page(DOCS / "storage.md", tmp_path, monkeypatch)["JSONFileTenantStore"]
    cases = [
        case
        for name, case in vars(store_contract).items()
        if name.startswith("test_") and inspect.iscoroutinefunction(case)
    ]
    ran = 0
    for case in cases:
        for kwargs in _parametrisations(case):
            store = store_class(tmp_path / f"contract-{ran}.json")
            asyncio.run(case(store=store, **kwargs))
            ran += 1
    assert ran >= len(cases) > 0
