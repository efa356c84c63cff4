"""``moglstm tune --storage``: database URLs, missing drivers, and a study that two
workers share on a real PostgreSQL server (started by the test when installed)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from moglstm.cli import main
from moglstm.lm.report import read_run
from tests.lm.test_tune import SRC, end_group, write_space

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("url", "needs"),
    [
        # SQLAlchemy 2.1 takes psycopg 3 for a plain postgresql:// URL
        ("postgresql://me:secret@127.0.0.1:1/db", "pip install 'psycopg[binary]'"),
        ("postgresql+psycopg2://me:secret@127.0.0.1:1/db", "pip install 'psycopg2-binary'"),
        ("mysql+pymysql://me:secret@127.0.0.1:1/db", "pip install 'PyMySQL'"),
    ],
)
def test_a_missing_driver_names_its_package(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    url: str,
    needs: str,
) -> None:
    for module in ("psycopg", "psycopg2", "pymysql"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails: not installed
    space = tmp_path / "s.yaml"
    space.write_text("space: {train.lr: {logfloat: [1.0e-4, 1.0e-2]}}")
    assert main(["tune", str(space), "--trials", "1", "--storage", url]) == 2
    err = capsys.readouterr().err
    assert needs in err and "secret" not in err and "Traceback" not in err
    if url.startswith("postgresql://"):  # the other URL form is named too
        assert "postgresql+psycopg2://... (pip install 'psycopg2-binary')" in err
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("not a url", "is not a database URL"),
        ("nosuchdb://x/y", "SQLAlchemy has no database 'nosuchdb'"),
    ],
)
def test_bad_storage_urls(tmp_path: Path, capsys: pytest.CaptureFixture, url, match) -> None:
    space = tmp_path / "s.yaml"
    space.write_text("space: {train.lr: {logfloat: [1.0e-4, 1.0e-2]}}")
    assert main(["tune", str(space), "--trials", "1", "--storage", url]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.slow
def test_any_sqlalchemy_url_works(tmp_path: Path, word_corpus_dir: Path) -> None:
    """A storage URL in another spelling than the default's (``sqlite:////abs``, with a
    query) is an RDB storage with heartbeats like the default."""
    from moglstm.lm.tune import tune

    space = write_space(tmp_path, word_corpus_dir, max_steps=2)
    url = f"sqlite:///{tmp_path / 'db' / 'elsewhere.db'}?timeout=30"
    summary = tune(space, trials=1, out_dir=tmp_path / "t", storage=url, heartbeat=5)
    assert summary["complete"] == 1 and summary["storage"] == url
    storage = optuna.storages.RDBStorage(url)
    assert storage.get_heartbeat_interval() is None  # ours was set on the worker's storage
    assert len(optuna.load_study(study_name="space", storage=storage).trials) == 1


# --------------------------------------------------------------------------- a real server


def _server_binaries() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(folder, "initdb").is_file():
            return Path(folder)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server of its own on 127.0.0.1 (trust auth, no fsync), its URL."""
    bin_dir = _server_binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) are not installed")
    psycopg = pytest.importorskip("psycopg", reason="psycopg 3 (the tune-postgres extra)")
    # the server refuses to run as root: then it runs as nobody, in a folder nobody owns
    prefix: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="moglstm-pg-"))
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(data, nobody.pw_uid, nobody.pw_gid)
        prefix = [
            "setpriv",
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
        ]
    server = None
    try:
        subprocess.run(
            [*prefix, str(bin_dir / "initdb"), "-D", str(data / "db"), "-U", "postgres"]
            + ["--auth=trust", "--no-sync", "-E", "UTF8"],
            check=True,
            capture_output=True,
            timeout=120,
            start_new_session=True,
        )
        port = _free_port()
        server = subprocess.Popen(
            [*prefix, str(bin_dir / "postgres"), "-D", str(data / "db"), "-p", str(port)]
            + ["-k", str(data), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + 60
        while True:
            try:
                with psycopg.connect(admin, autocommit=True) as connection:
                    connection.execute("CREATE DATABASE moglstm")
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)
        yield f"postgresql://postgres:unused@127.0.0.1:{port}/moglstm"
    finally:
        if server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGINT)  # a "fast" shutdown: clients cut off
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                end_group(server)
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study(
    tmp_path: Path, word_corpus_dir: Path, postgres_url: str
) -> None:
    space = write_space(tmp_path, word_corpus_dir, max_steps=4)
    argv = ["tune", str(space), "--trials", "3", "--out-dir", str(tmp_path / "tune")]
    argv += ["--storage", postgres_url, "--pruner", "none"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    worker = "import sys; from moglstm.cli import main; sys.exit(main(sys.argv[1:]))"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", worker, *argv, "--seed", str(seed)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for seed in range(2)
    ]
    try:
        outputs = [w.communicate(timeout=300) for w in workers]
    finally:
        for w in workers:
            end_group(w)
    for w, (_, stderr) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, stderr
    study = optuna.load_study(study_name="space", storage=postgres_url)
    ran = [t for t in study.trials if not t.user_attrs.get("skipped")]
    assert [t.state.name for t in ran] == ["COMPLETE"] * 3  # the study-wide budget
    dirs = {t.user_attrs["run_dir"] for t in ran}
    assert len(dirs) == 3 and all(read_run(d).status == "done" for d in dirs)
