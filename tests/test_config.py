"""Settings: .env.example documents exactly what the code reads, only iota/config reads the environment, and
settings parse from IOTA_* variables and .env with clear errors."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import get_args

import pytest
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from iota.auth import create_wallet
from iota.cli import main
from iota.config import MinerSettings, OrchestratorSettings, RunSettings, ValidatorSettings, env_example
from iota.config.settings import SCRIPT_VARIABLES, SettingsError, load, shown
from iota.model import PRESETS

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
    # iota/local.py builds its children's environments by name: a typo there would be silently ignored. The
    # scripts' own variables are named once, in the list the unknown-name warning leaves out.
    known = role_settings() | SCRIPT_VARIABLES
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
        f"IOTA_ORCHESTRATOR_HOTKEY={HOTKEY}\n"
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
    with pytest.raises(SettingsError, match="IOTA_CACHE_SIZE"):
        load(MinerSettings)


# -- (d) start-up checks: one line per mistake, naming the variable, where it came from and what is allowed -------

HOTKEY = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"  # a well-formed ss58 (Alice's, a public test key)


def cli_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """`iota ARGV` in this process: its exit code and the lines it wrote to stderr."""
    code = main(argv)
    return code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(
    ("argv", "env", "variable", "allowed"),
    [
        (["orchestrator"], {"IOTA_PORT": "80OO"}, "IOTA_PORT='80OO'", "valid integer"),
        (["orchestrator"], {"IOTA_PRESET": "1B"}, "IOTA_PRESET='1B'", "'1b'"),
        (["orchestrator"], {"IOTA_STATE_URL": "localhost/iota"}, "IOTA_STATE_URL", "postgresql://"),
        (["miner"], {"IOTA_ORCHESTRATOR_URL": "203.0.113.7:8000"}, "IOTA_ORCHESTRATOR_URL", "http://"),
        (
            ["validator"],
            {"IOTA_ORCHESTRATOR_URL": "orchestrator.example.org"},
            "IOTA_ORCHESTRATOR_URL",
            "https://",
        ),
        (["miner"], {"IOTA_DEVICE": "gpu"}, "IOTA_DEVICE='gpu'", "cuda:N"),
        (["miner"], {"IOTA_ORCHESTRATOR_HOTKEY": "5F-not-a-key"}, "IOTA_ORCHESTRATOR_HOTKEY", "ss58"),
    ],
)
def test_a_bad_value_stops_the_role_with_one_line_naming_it(
    clean_cwd: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    env: dict[str, str],
    variable: str,
    allowed: str,
) -> None:
    monkeypatch.setenv("IOTA_ORCHESTRATOR_HOTKEY", HOTKEY)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, lines = cli_errors(argv, capsys)
    assert code == 2
    assert len(lines) == 1, lines  # one problem, one line: no traceback
    assert (
        lines[0].startswith(f"iota: error: {variable}")
        and "(environment)" in lines[0]
        and allowed in lines[0]
    )


def test_a_bad_value_in_dotenv_names_the_file(clean_cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (clean_cwd / ".env").write_text("IOTA_STORE=S3\n")  # values are lower case
    code, lines = cli_errors(["orchestrator"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "IOTA_STORE='S3'" in lines[0] and str(clean_cwd / ".env") in lines[0] and "'s3'" in lines[0]


def test_every_mistake_is_reported_at_once(clean_cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTA_PORT", "80OO")
    monkeypatch.setenv("IOTA_STORE", "S3")
    with pytest.raises(SettingsError) as error:
        load(OrchestratorSettings)
    assert [p.split("=")[0] for p in error.value.problems] == ["IOTA_PORT", "IOTA_STORE"]


@pytest.mark.parametrize("role", ["miner", "validator"])
def test_the_empty_orchestrator_hotkey_is_a_clear_stop(
    clean_cwd: Path, capsys: pytest.CaptureFixture[str], role: str
) -> None:
    # The default: every signed request would be refused, and PM2 would restart the role in a loop.
    code, lines = cli_errors([role], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("iota: error: IOTA_ORCHESTRATOR_HOTKEY is empty") and "/run" in lines[0]


def test_a_misspelt_setting_is_warned_about_with_the_closest_name(
    clean_cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IOTA_ORCHESTRATOR_HOTKY", HOTKEY)
    (clean_cwd / ".env").write_text("IOTA_WEIGHT_INTERVAL_S=1200\nIOTA_SKIP_SETUP=1\nIOTA_ZZZZ=1\n")
    code, lines = cli_errors(["config"], capsys)
    assert code == 0
    assert len(lines) == 3, lines  # IOTA_SKIP_SETUP is read by the scripts: no warning
    hotky, weight, zzzz = sorted(lines)
    assert (
        "IOTA_ORCHESTRATOR_HOTKY (environment)" in hotky and "did you mean IOTA_ORCHESTRATOR_HOTKEY?" in hotky
    )
    assert str(clean_cwd / ".env") in weight and "did you mean IOTA_WEIGHTS_INTERVAL_S?" in weight
    assert "IOTA_ZZZZ" in zzzz and "iota config" in zzzz


def test_the_preset_list_is_the_models() -> None:
    assert get_args(RunSettings.model_fields["preset"].annotation) == PRESETS


def test_secrets_are_never_shown() -> None:
    assert (
        shown("state_url", "postgresql://iota:hunter2@db:5432/iota") == "postgresql://iota:***@db:5432/iota"
    )
    assert "hunter2" not in shown("s3_secret_key", "hunter2") and shown("s3_secret_key", "") == ""


def test_config_check_prints_what_each_role_uses_and_its_problems(
    clean_cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    create_wallet(clean_cwd / "wallets", "default", "default")
    monkeypatch.setenv("IOTA_WALLET_PATH", str(clean_cwd / "wallets"))
    (clean_cwd / ".env").write_text("IOTA_PORT=9001\nIOTA_STATE_URL=postgresql://iota:hunter2@db/iota\n")
    assert main(["config", "check", "--role", "orchestrator"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"IOTA_PORT +9001 +\({re.escape(str(clean_cwd / '.env'))}\)", out)
    assert re.search(r"IOTA_HOST +127\.0\.0\.1 +\(default\)", out)
    assert "hunter2" not in out and "postgresql://iota:***@db/iota" in out
    assert "no problems" in out
    # The miner has no orchestrator hotkey yet: the check says so and fails, as `iota miner` would.
    assert main(["config", "check"]) == 2
    out = capsys.readouterr().out
    assert "miner:\n  problem: IOTA_ORCHESTRATOR_HOTKEY is empty" in out
    assert "validator:\n  problem: IOTA_ORCHESTRATOR_HOTKEY is empty" in out


def test_a_missing_wallet_is_one_line_with_the_command_that_makes_it(
    clean_cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IOTA_WALLET_PATH", str(clean_cwd / "none"))
    code, lines = cli_errors(["orchestrator"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "IOTA_WALLET_PATH" in lines[0] and f"iota wallet create --path {clean_cwd / 'none'}" in lines[0]


def test_the_weights_interval_defaults_to_the_chains_limit() -> None:
    # Subtensor's weights_rate_limit is 100 blocks of 12 s: a shorter interval makes every second set_weights fail.
    assert ValidatorSettings.model_fields["weights_interval_s"].default == 1200.0
