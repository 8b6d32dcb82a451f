"""What the orchestrator needs, checked before it migrates or prepares anything: its object store, database, chain
and data. Each failure is one line that names the setting and the command that fixes it; and the start-up banner.

Without these checks a missing bucket surfaced only after the database was migrated and the data prepared, as a
40-line NoSuchBucket traceback, and a supervisor restarted the process into the same failure."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from iota.chain.base import Chain
from iota.config import OrchestratorSettings
from iota.config.settings import shown
from iota.data import kjv_path
from iota.orchestrator.assembly import make_store, public_url
from iota.storage import StoreError
from iota.train.run import prepared_dir

CONNECT_TIMEOUT_S = 5  # a database that does not answer this soon is reported, not waited on


def preflight(settings: OrchestratorSettings, make_chain: Callable[[], Chain]) -> list[str]:
    """One line per thing the orchestrator cannot work without; [] when it may start."""
    checks = (
        lambda: check_run_dir(settings),
        lambda: check_store(settings),
        lambda: check_database(settings),
        lambda: check_chain(settings, make_chain),
        lambda: check_data(settings),
    )
    return [problem for check in checks if (problem := check())]


def state_url(settings: OrchestratorSettings) -> str:
    """The database the orchestrator opens: IOTA_STATE_URL, or SQLite in the run directory."""
    return settings.state_url or f"sqlite:///{Path(settings.run_dir) / 'state.db'}"


def banner(settings: OrchestratorSettings, hotkey: str) -> list[str]:
    """What an operator publishes (URL and hotkey, which every miner and validator must set) and what this
    process uses (run, store, database with its password hidden), logged once at start-up."""
    store = (
        f"s3 bucket {settings.s3_bucket} at {settings.s3_endpoint or 'AWS'}"
        if settings.store == "s3"
        else f"local folder {Path(settings.run_dir).resolve() / 'store'}"
    )
    return [
        f"orchestrator URL  {public_url(settings)}  (miners and validators: IOTA_ORCHESTRATOR_URL)",
        f"hotkey            {hotkey}  (miners and validators: IOTA_ORCHESTRATOR_HOTKEY)",
        f"run               {settings.run_id}, preset {settings.preset}, {settings.stages} stages",
        f"store             {store}",
        f"database          {shown('state_url', state_url(settings))}",
        f"chain             {settings.chain} "
        + (
            f"({settings.chain_path})"
            if settings.chain == "local"
            else f"({settings.network}, netuid {settings.netuid})"
        ),
    ]


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK | os.X_OK)


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_run_dir(settings: OrchestratorSettings) -> str | None:
    run_dir = Path(settings.run_dir)
    if _writable(run_dir):
        return None
    return (
        f"IOTA_RUN_DIR={run_dir} is not a writable directory: `mkdir -p {run_dir}` as the user that runs iota"
    )


def check_store(settings: OrchestratorSettings) -> str | None:
    """Write and delete one object: the bucket exists and these credentials may write to it."""
    probe = f"runs/{settings.run_id}/preflight-{uuid.uuid4().hex}"
    try:
        store, _ = make_store(settings)
        store.put(probe, b"")
        store.delete(probe)
    except (StoreError, OSError, ValueError) as error:
        if settings.store == "local":
            where = Path(settings.run_dir) / "store"
            return f"IOTA_STORE=local: cannot write to {where}: {_one_line(error)}"
        return _bucket_problem(settings, error)
    return None


def _bucket_problem(settings: OrchestratorSettings, error: BaseException) -> str:
    bucket, endpoint = settings.s3_bucket, settings.s3_endpoint
    where = endpoint or "AWS"
    if "NoSuchBucket" in str(error):
        cli_endpoint = f" --endpoint-url {endpoint}" if endpoint else ""
        py_endpoint = f"endpoint_url='{endpoint}'" if endpoint else ""
        return (
            f"IOTA_S3_BUCKET={bucket}: no such bucket at {where}; create it with "
            f"`aws s3 mb s3://{bucket}{cli_endpoint}` or "
            f"`python -c \"import boto3; boto3.client('s3', {py_endpoint}).create_bucket(Bucket='{bucket}')\"`"
        )
    if any(code in str(error) for code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")):
        return f"IOTA_S3_ACCESS_KEY/IOTA_S3_SECRET_KEY: bucket {bucket} at {where} refused them: {_one_line(error)}"
    return f"IOTA_S3_ENDPOINT={where}: cannot use bucket {bucket} there: {_one_line(error)}"


def check_database(settings: OrchestratorSettings) -> str | None:
    url = state_url(settings)
    if url.startswith("sqlite:///"):
        folder = Path(url[len("sqlite:///") :]).parent
        if url.endswith(":memory:") or _writable(folder):
            return None
        return f"IOTA_STATE_URL={url}: the folder {folder} is not writable"
    try:
        import psycopg
    except ImportError:
        return "IOTA_STATE_URL names PostgreSQL but psycopg is not installed: `bash setup.sh orchestrator`"
    try:
        with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as error:
        return f"IOTA_STATE_URL={shown('state_url', url)}: {_database_fix(url, str(error))}"
    return None


def _database_fix(url: str, message: str) -> str:
    """What the operator runs for the usual PostgreSQL failures (a role or database not created yet, the server
    not listening); the server's own message otherwise."""
    parts = urlsplit(url)
    user, database = parts.username or "iota", parts.path.lstrip("/") or "iota"
    text = " ".join(message.split())
    if f'role "{user}" does not exist' in text:
        return (
            f"no database user {user}: `sudo -u postgres createuser --pwprompt {user}` and "
            f"`sudo -u postgres createdb --owner {user} {database}`"
        )
    if f'database "{database}" does not exist' in text:
        return f"no database {database}: `sudo -u postgres createdb --owner {user} {database}`"
    if "password authentication failed" in text:
        return (
            f"the password of {user} is wrong: fix the URL or set it with "
            f"`sudo -u postgres psql -c \"ALTER USER {user} PASSWORD '...'\"`"
        )
    host = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
    return f"PostgreSQL does not answer at {host} (is it running? `sudo systemctl start postgresql`): {text[:200]}"


def check_chain(settings: OrchestratorSettings, make_chain: Callable[[], Chain]) -> str | None:
    try:
        make_chain().neurons()
    # A chain client fails in its own ways (websocket, substrate, file lock errors); each one means the same here.
    except Exception as error:  # noqa: BLE001
        if settings.chain == "local":
            return f"IOTA_CHAIN_PATH={settings.chain_path}: cannot read the local chain: {_one_line(error)}"
        return f"IOTA_NETWORK={settings.network} (netuid {settings.netuid}): chain unreachable: {_one_line(error)}"
    return None


def check_data(settings: OrchestratorSettings) -> str | None:
    """Data prepared already, or a corpus to prepare it from and a folder to write it to."""
    if (prepared_dir(settings) / "manifest.json").is_file():
        return None
    if not _writable(Path(settings.data_dir)):
        return f"IOTA_DATA_DIR={settings.data_dir} is not a writable directory"
    missing = [p for p in settings.corpus.split(",") if p and not Path(p).exists()]
    if missing:
        return f"IOTA_CORPUS={settings.corpus}: no such file or folder {', '.join(missing)}"
    if not settings.corpus:
        try:
            kjv_path()
        except FileNotFoundError as error:
            return f"IOTA_CORPUS is empty and the default corpus is missing: {error} (or set IOTA_CORPUS)"
    return None
