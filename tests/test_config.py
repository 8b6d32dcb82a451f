"""Settings: .env.example documents exactly what the code reads, only iota/config reads the environment, and
settings parse from IOTA_* variables and .env with clear errors."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from iota.config import MinerSettings, OrchestratorSettings, RunSettings, ValidatorSettings, env_example
from iota.config.settings import load

REPO = Path(__file__).resolve().parent.parent
IOTA = REPO / "iota"
ENV_EXAMPLE = REPO / ".env.example"
ROLES: list[type[BaseSettings]] = [OrchestratorSettings, MinerSettings, ValidatorSettings]
SETTING_LINE = re.compile(r"^(IOTA_[A-Z0-9_]+)=(.*)$")


def role_settings() -> set[str]:
    return {f"IOTA_{name.upper()}" for cls in ROLES for name in cls.model_fields}


def parse_env_example() -> dict[str, str]:
    """IOTA_NAME -> default text; every setting must follow a non-empty comment that explains it."""
    lines = ENV_EXAMPLE.read_text().splitlines()
    found: dict[str, str] = {}
    for number, line in enumerate(lines):
        if not line.strip() or line.startswith("#"):
            continue
        match = SETTING_LINE.match(line)
        assert match, f".env.example line {number + 1} is neither a comment nor IOTA_NAME=value: {line!r}"
        name, value = match.groups()
        assert name not in found, f"{name} is listed twice"
        previous = lines[number - 1] if number else ""
        assert previous.startswith("#") and previous.lstrip("#").strip(), (
            f"{name} is not preceded by a comment line explaining it"
        )
        found[name] = value
    return found


# -- (a) .env.example ----------------------------------------------------------------------------------------


def test_env_example_is_what_the_generator_writes() -> None:
    assert ENV_EXAMPLE.read_text() == env_example(), "regenerate it: iota config > .env.example"


def test_env_example_lists_exactly_the_settings_of_the_roles() -> None:
    listed = parse_env_example()
    expected = role_settings()
    assert set(listed) == expected, (
        f"missing: {sorted(expected - set(listed))}; not read by any role: {sorted(set(listed) - expected)}"
    )


@pytest.mark.parametrize("cls", ROLES, ids=lambda c: c.__name__)
def test_env_example_values_are_the_defaults(
    cls: type[BaseSettings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Parsed by the settings class itself, each value in the file must give back the field's default.
    monkeypatch.chdir(tmp_path)
    listed = parse_env_example()
    for name, info in cls.model_fields.items():
        assert info.description, f"{cls.__name__}.{name} has no description for .env.example and --help"
        value = listed[f"IOTA_{name.upper()}"]
        parsed = getattr(cls(**{"_env_file": None, name: value}), name)  # type: ignore[arg-type]
        assert parsed == info.default, (
            f"IOTA_{name.upper()}={value} parses to {parsed!r}, not {info.default!r}"
        )
    from_file = cls(_env_file=ENV_EXAMPLE)  # type: ignore[call-arg]
    assert from_file == cls(_env_file=None)  # type: ignore[call-arg]


def test_every_iota_variable_named_in_the_code_is_a_setting() -> None:
    # iota/local.py builds its children's environments by name: a typo there would be silently ignored.
    known = role_settings()
    unknown = []
    for path in IOTA.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if re.fullmatch(r"IOTA_[A-Z0-9_]+", node.value) and node.value not in known:
                    unknown.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value}")
    assert not unknown


# -- (b) only iota/config reads the environment ----------------------------------------------------------------

ENV_FUNCTIONS = {"getenv", "putenv", "unsetenv", "getenvb"}
ENV_MAPPINGS = {"environ", "environb"}


def environment_uses(path: Path) -> list[tuple[int, str]]:
    """(line, what) for every touch of the process environment: os.environ/os.getenv/..., however imported."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = {"os"}  # names bound to the os module
    direct: set[str] = set()  # names bound to os.environ, os.getenv, ... by `from os import ...`
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "os"}
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            direct |= {a.asname or a.name for a in node.names if a.name in ENV_FUNCTIONS | ENV_MAPPINGS}
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr in ENV_FUNCTIONS | ENV_MAPPINGS:
                uses.append((node.lineno, f"os.{node.attr}"))
        elif isinstance(node, ast.Name) and node.id in direct:
            uses.append((node.lineno, node.id))
        elif (
            isinstance(node, ast.ImportFrom) and node.module == "os" and direct & {a.name for a in node.names}
        ):
            uses.append((node.lineno, "from os import " + ", ".join(a.name for a in node.names)))
    return uses


# iota/local.py starts the roles as subprocesses and must hand them the parent's environment (PATH, PYTHONPATH,
# CUDA_VISIBLE_DEVICES, ...): it may copy os.environ, but not read a setting from it.
ENVIRONMENT_COPIERS = {IOTA / "local" / "network.py"}


def test_only_iota_config_reads_the_environment() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{line} {what}"
        for path in sorted(IOTA.rglob("*.py"))
        if IOTA / "config" not in path.parents and path not in ENVIRONMENT_COPIERS
        for line, what in environment_uses(path)
    ]
    assert not offenders, "settings arrive as arguments; only iota/config reads the environment"


def test_the_environment_check_catches_every_form(tmp_path: Path) -> None:
    source = tmp_path / "reads.py"
    source.write_text(
        "import os\nimport os as o\nfrom os import getenv, environ as env\n"
        "a = os.environ['X']\nb = o.getenv('X')\nc = getenv('X')\nd = env.get('X')\nos.putenv('X', '1')\n"
    )
    kinds = [what for _, what in environment_uses(source)]
    assert kinds.count("os.environ") == 1 and "os.getenv" in kinds and "os.putenv" in kinds
    assert "getenv" in kinds and "env" in kinds


def copies_only(path: Path) -> list[str]:
    """Uses of os.environ other than taking a whole copy (`.items()`, `.copy()`, `dict(...)`, `{**...}`)."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        if node.attr in ENV_FUNCTIONS:
            bad.append(f"{path.name}:{node.lineno} os.{node.attr}")
        if node.attr not in ENV_MAPPINGS:
            continue
        parent = parents[node]
        whole_copy = (
            (isinstance(parent, ast.Attribute) and parent.attr in {"items", "copy", "keys"})
            or (
                isinstance(parent, ast.Call)
                and isinstance(parent.func, ast.Name)
                and parent.func.id == "dict"
            )
            or isinstance(parent, ast.Dict)  # {**os.environ}
        )
        if not whole_copy:
            bad.append(f"{path.name}:{node.lineno} reads os.{node.attr} ({ast.unparse(parent)[:60]})")
    return bad


def test_local_only_copies_the_environment() -> None:
    for path in ENVIRONMENT_COPIERS:
        assert not copies_only(path)


def test_copy_check_tells_a_copy_from_a_read(tmp_path: Path) -> None:
    source = tmp_path / "copies.py"
    source.write_text(
        "import os\na = {k: v for k, v in os.environ.items()}\nb = dict(os.environ)\nc = {**os.environ}\n"
    )
    assert copies_only(source) == []
    source.write_text("import os\nkey = os.environ.get('IOTA_S3_SECRET_KEY', '')\n")
    assert len(copies_only(source)) == 1


# -- (c) parsing ---------------------------------------------------------------------------------------------


@pytest.fixture
def clean_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory without a .env, as every settings class reads ./.env."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_settings_come_from_iota_prefixed_variables(clean_cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTA_MICRO_BATCH", "4")
    monkeypatch.setenv("IOTA_AUTOCAST", "false")
    monkeypatch.setenv("IOTA_WALLET_PATH", "/keys")
    monkeypatch.setenv("SEED", "99")  # without the prefix: not a setting
    run = RunSettings()
    assert run.micro_batch == 4 and run.seed == 0
    miner = MinerSettings()
    assert miner.autocast is False and miner.wallet_path == Path("/keys")


def test_settings_come_from_dotenv_and_the_environment_wins(
    clean_cwd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (clean_cwd / ".env").write_text(
        "# one file for every role\nIOTA_PORT=9001\nIOTA_LR=0.01\nIOTA_ORCHESTRATOR_URL=http://o:1\n"
    )
    orchestrator = load(OrchestratorSettings)
    assert orchestrator.port == 9001 and orchestrator.lr == 0.01
    # Each role takes its own settings from the shared file and ignores the others'.
    assert load(MinerSettings).orchestrator_url == "http://o:1"
    assert load(ValidatorSettings).orchestrator_url == "http://o:1"
    # Only entry points read .env: a library building settings directly does not see the file.
    assert OrchestratorSettings().port != 9001
    monkeypatch.setenv("IOTA_PORT", "9002")
    assert load(OrchestratorSettings).port == 9002


@pytest.mark.parametrize(
    ("name", "value", "field", "hint"),
    [
        ("IOTA_PORT", "eighty", "port", "integer"),
        ("IOTA_CHAIN", "moon", "chain", "'local' or 'bittensor'"),
        ("IOTA_WIRE_DTYPE", "fp8", "wire_dtype", "'bf16' or 'fp32'"),
        ("IOTA_LR", "fast", "lr", "number"),
    ],
)
def test_bad_values_give_a_clear_error(
    clean_cwd: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, field: str, hint: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as error:
        OrchestratorSettings()
    message = str(error.value)
    assert field in message and value in message and hint in message
    assert error.value.error_count() == 1


def test_a_bad_value_in_dotenv_is_reported_too(clean_cwd: Path) -> None:
    (clean_cwd / ".env").write_text("IOTA_CACHE_SIZE=-x\n")
    with pytest.raises(ValidationError, match="cache_size"):
        load(MinerSettings)
