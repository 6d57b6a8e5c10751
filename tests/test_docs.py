"""Docs that cannot drift: docs/configuration.md against the environment variables the code reads, the presets
against train_gpt.py's defaults, the README's quick-start commands against .ci/run, links, length and wording.
Everything is read from the source text (ast for Python): these tests import nothing of the kit and take about a
second.

  python -m pytest -q tests/test_docs.py
"""
import ast
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = REPO_ROOT / "docs" / "configuration.md"

# The files whose environment reads docs/configuration.md documents (globs relative to the repo root).
READERS = ("train_gpt.py", "run.sh", "devkit.py", "data/*.py", "bench/*.py", "analysis/*.py", "records/*.py")

# Knobs that change from one run to the next, so configs/competition_8xh100.env leaves them out (its header says
# why): the run's name and seed (run.sh sets both for each seed), an artifact to evaluate instead of training, and
# the per-target dump. The one list of them; docs/configuration.md marks the same knobs "per run".
PER_RUN_KNOBS = {"RUN_ID", "SEED", "EVAL_ARTIFACT", "EVAL_DUMP"}

# Words about how the project is developed rather than what it does; the docs describe the kit and its figures.
PROCESS_WORDS = re.compile(r"issue \d+|\bsession\b|this task|\bagents?\b|"
                           r"\b(?:a|the|this|previous|later|earlier|next) stop\b", re.IGNORECASE)
README_MAX_LINES = 250

# A default that is an expression the docs cannot repeat (a path built at import time, another knob's value).
NOT_LITERAL = object()


def reader_files() -> list[Path]:
    return sorted({p for pattern in READERS for p in REPO_ROOT.glob(pattern) if p.is_file()})


def is_os_environ(node: ast.AST) -> bool:
    return ast.unparse(node) == "os.environ"


def python_env_reads(path: Path, scope: str | None = None) -> dict[str, object]:
    """NAME -> default of every environment read in a Python file: os.environ.get / os.getenv (the default's
    literal value, None without one, NOT_LITERAL for an expression), os.environ["NAME"] and "NAME" in os.environ
    (None). The calls may sit inside int() / float() / bool(int()). scope: only inside this class."""
    tree = ast.parse(path.read_text())
    if scope is not None:
        tree = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == scope)
    reads: dict[str, object] = {}
    for node in ast.walk(tree):
        name, default = None, None
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == "get" and is_os_environ(func.value)) or \
                    ast.unparse(func) == "os.getenv":
                name = node.args[0].value
                if len(node.args) > 1:
                    try:
                        default = ast.literal_eval(node.args[1])
                    except ValueError:
                        default = NOT_LITERAL
        elif isinstance(node, ast.Subscript) and is_os_environ(node.value) and isinstance(node.slice, ast.Constant):
            name = node.slice.value
        elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) and \
                any(isinstance(op, ast.In) for op in node.ops) and any(is_os_environ(c) for c in node.comparators):
            name = node.left.value
        if isinstance(name, str):
            # A get() with its default wins over a bare membership test of the same name.
            if name not in reads or reads[name] is None:
                reads[name] = default
    return reads


def shell_env_reads(path: Path) -> dict[str, object]:
    """NAME -> default of a shell script's ${NAME:-default} (quotes dropped) and ${NAME:?message} ("required"):
    the forms run.sh reads its inputs with (its other $names are its own variables)."""
    reads: dict[str, object] = {}
    text = path.read_text()
    for name, op, value in re.findall(r"\$\{(\w+):([-?])([^}]*)\}", text):
        reads[name] = value.strip('"') if op == "-" else "required"
    return reads


def env_reads(path: Path) -> dict[str, object]:
    return python_env_reads(path) if path.suffix == ".py" else shell_env_reads(path)


def hyperparameter_defaults() -> dict[str, object]:
    """Every knob of train_gpt.py's Hyperparameters and its default as written in the code."""
    return python_env_reads(REPO_ROOT / "train_gpt.py", scope="Hyperparameters")


def documented_defaults() -> dict[str, str]:
    """NAME -> default cell of every row of docs/configuration.md's tables whose second column is "default"."""
    rows: dict[str, str] = {}
    in_table = False
    for line in CONFIGURATION.read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]] if line.startswith("|") else []
        if not cells:
            in_table = False
        elif len(cells) >= 3 and cells[1].lower() == "default":
            in_table = True
        elif in_table and not set(cells[0]) <= set("-: "):
            name = cells[0].strip("`")
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name), f"one variable per row, got {cells[0]!r}"
            assert name not in rows, f"{name} documented twice"
            rows[name] = cells[1]
    return rows


def same_default(documented: str, code: object) -> bool:
    """A documented default matches the code's: numbers compared as floats (23000000 == 23_000_000, 600 == 600.0),
    True/False as 1/0, `""` for the empty string, "required" or "unset" for a read without a default, backticks
    ignored."""
    doc = documented.strip().strip("`")
    doc = "" if doc == '""' else doc
    if code is None:
        return doc in ("required", "unset")
    if isinstance(code, bool):
        code = int(code)
    doc_number = {"true": 1.0, "false": 0.0}.get(doc.lower())
    try:
        doc_number = float(doc.replace("_", "")) if doc_number is None else doc_number
        return float(code) == doc_number
    except (TypeError, ValueError):
        return str(code) == doc


def default_for(cell: str, path: Path) -> str | None:
    """The documented default that applies to `path`. A variable two files read with different defaults lists
    each with its file, "`8` (run.sh); `1` (records/prove_causality.py)"; None if `path` is not among them."""
    per_file = re.findall(r"\s*([^;]+?)\s*\(`?([\w./-]+\.(?:py|sh))`?\)", cell)
    if not per_file:
        return cell
    return {file: value for value, file in per_file}.get(path.relative_to(REPO_ROOT).as_posix())


def env_file(path: Path) -> dict[str, str]:
    """The NAME=value lines of a configs/*.env file (comments are whole lines there)."""
    pairs = [line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return {name.strip(): value.strip() for name, value in pairs}


def test_every_env_var_the_code_reads_is_documented_with_its_default():
    """Each environment variable read by train_gpt.py, run.sh, devkit.py, data/, bench/, analysis/ or records/
    has a row in docs/configuration.md, whose default equals the code's where the code's is a literal (per file
    where two files read it with different defaults)."""
    documented = documented_defaults()
    missing, wrong = [], []
    for path in reader_files():
        for name, default in env_reads(path).items():
            where = path.relative_to(REPO_ROOT)
            if name not in documented:
                missing.append(f"{name} ({where})")
                continue
            cell = default_for(documented[name], path)
            if default is not NOT_LITERAL and (cell is None or not same_default(cell, default)):
                wrong.append(f"{name} in {where}: documented {documented[name]}, code {default!r}")
    assert not missing, f"not in docs/configuration.md: {missing}"
    assert not wrong, f"defaults differ: {wrong}"


def test_every_documented_env_var_is_read_by_the_code():
    """No row of docs/configuration.md documents a variable that no file of the project reads."""
    read = set().union(*(env_reads(path) for path in reader_files()))
    assert sorted(set(documented_defaults()) - read) == []


def test_competition_preset_is_exactly_the_defaults():
    """configs/competition_8xh100.env sets every Hyperparameters knob except the per-run ones, each to the
    default train_gpt.py has in code, so a record folder states every setting and the preset cannot go stale."""
    defaults = hyperparameter_defaults()
    preset = env_file(REPO_ROOT / "configs" / "competition_8xh100.env")
    wrong = {k: (v, defaults.get(k)) for k, v in preset.items()
             if k not in defaults or not same_default(v, defaults[k])}
    assert wrong == {}, f"preset value != code default, {{name: (preset, code)}}: {wrong}"
    assert sorted(set(defaults) - PER_RUN_KNOBS - set(preset)) == []
    assert sorted(PER_RUN_KNOBS & set(preset)) == []


def test_every_preset_key_is_a_knob():
    """Every key of every configs/*.env file is a Hyperparameters knob of train_gpt.py (a misspelt key would be
    ignored silently by the run)."""
    knobs = set(hyperparameter_defaults())
    unknown = {p.name: sorted(set(env_file(p)) - knobs) for p in sorted((REPO_ROOT / "configs").glob("*.env"))}
    assert {name: keys for name, keys in unknown.items() if keys} == {}


def readme_commands() -> list[str]:
    """Every line of the README's fenced code blocks."""
    blocks = re.findall(r"^```\w*\n(.*?)^```", (REPO_ROOT / "README.md").read_text(), re.M | re.S)
    return [line.strip() for block in blocks for line in block.splitlines()]


def test_readme_quick_start_commands_match_ci():
    """The README's two quick-start commands: the one-line install + sample run (the same torch and requirements
    as .ci/run installs, configs/sample_cpu.env, train_gpt.py), and exactly the pytest command .ci/run runs."""
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    pytest_command = re.search(r"^(python -m pytest\b.*)$", ci, re.M).group(1).strip()
    install = re.search(r"pip install (?:-q )?(torch==\S+ -r requirements\.txt)", ci).group(1)
    commands = readme_commands()
    assert any(part.strip() == pytest_command for line in commands for part in line.split("&&")), pytest_command
    run_lines = [line for line in commands if f"pip install {install}" in line]
    assert any("configs/sample_cpu.env" in line and line.endswith("python train_gpt.py") for line in run_lines)


def test_readme_length_and_docs_wording():
    """README.md stays a short user's page (<= 250 lines) and no doc speaks of how the project is developed."""
    lines = len((REPO_ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; topic docs belong in docs/"
    hits = []
    for path in markdown_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            hits += [f"{path.relative_to(REPO_ROOT)}:{number}: {m.group(0)!r}" for m in PROCESS_WORDS.finditer(line)]
    assert hits == []


def markdown_files() -> list[Path]:
    names = ["README.md", "data/README.md", "records/README.md"]
    return [REPO_ROOT / n for n in names] + sorted((REPO_ROOT / "docs").glob("*.md"))


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lowercased, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_doc_links_point_at_files():
    """Every relative link and image in the README and docs/ names a file or folder of the repository, and a link
    into a Markdown file's section names one of its headings."""
    broken = []
    for path in markdown_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = path.parent / file if file else path
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked)):
                broken.append(f"{path.relative_to(REPO_ROOT)}: {target}")
    assert broken == []
