"""Downloads against a local HTTP server on 127.0.0.1 (never the internet)."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from moglstm.lm import data
from moglstm.lm.config import DataConfig
from moglstm.lm.data import (
    ChecksumError,
    DownloadError,
    download,
    fetch_corpus,
    load_corpus,
    sources,
)


def sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


@dataclass
class Server:
    """Serves ``files`` by name; ``truncated`` names are cut short; counts requests."""

    url: str
    files: dict[str, bytes] = field(default_factory=dict)
    truncated: set[str] = field(default_factory=set)
    hits: Counter = field(default_factory=Counter)


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            name = self.path.lstrip("/")
            state.hits[name] += 1
            if name not in state.files:
                self.send_error(404)
                return
            body = state.files[name]
            self.send_response(200)
            extra = 1000 if name in state.truncated else 0  # promise more than is sent
            self.send_header("Content-Length", str(len(body) + extra))
            self.end_headers()
            self.wfile.write(body)  # HTTP/1.0: the connection closes after this

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


# --------------------------------------------------------------------------- download()


def test_download_right_file_and_reuse(server, tmp_path):
    body = b"hello corpus\n" * 1000
    server.files["f.txt"] = body
    dest = tmp_path / "sub" / "f.txt"
    assert download(server.url + "f.txt", dest, sha(body)) == dest
    assert dest.read_bytes() == body and leftovers(tmp_path / "sub") == ["f.txt"]
    download(server.url + "f.txt", dest, sha(body))
    assert server.hits["f.txt"] == 1  # verified file reused, no second request


def test_download_replaces_a_file_that_does_not_verify(server, tmp_path):
    server.files["f.txt"] = b"good"
    dest = tmp_path / "f.txt"
    dest.write_bytes(b"stale")
    download(server.url + "f.txt", dest, sha(b"good"))
    assert dest.read_bytes() == b"good"


def test_download_wrong_checksum_leaves_nothing(server, tmp_path):
    server.files["f.txt"] = b"tampered"
    with pytest.raises(ChecksumError, match="SHA-256 mismatch"):
        download(server.url + "f.txt", tmp_path / "f.txt", sha(b"original"))
    assert leftovers(tmp_path) == []


def test_download_truncated_transfer_leaves_nothing(server, tmp_path):
    server.files["f.txt"] = b"x" * 5000
    server.truncated.add("f.txt")
    with pytest.raises(DownloadError, match="truncated transfer .*got 5000 of 6000 bytes"):
        download(server.url + "f.txt", tmp_path / "f.txt", sha(b"x" * 5000))
    assert leftovers(tmp_path) == []


def test_download_http_error_and_server_down(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download(server.url + "missing.txt", tmp_path / "m.txt", sha(b""))
    closed = os.environ["MOGLSTM_MIRROR"]  # conftest: a local port nothing listens on
    with pytest.raises(DownloadError, match="failed"):
        download(closed + "f.txt", tmp_path / "f.txt", sha(b""), timeout=5)
    assert leftovers(tmp_path) == []


def test_download_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="sha256"):
        download("http://127.0.0.1/x", tmp_path / "x", "abc")
    with pytest.raises(ValueError, match="url"):
        download("", tmp_path / "x", "0" * 64)


# --------------------------------------------------------------------------- named corpora


@pytest.fixture
def ptb_files(monkeypatch) -> dict[str, bytes]:
    """Tiny ptb files under their published names, with the checksum table patched."""
    texts = {
        "train": b" the cat sat \n a dog ran \n",
        "valid": b" the dog sat \n",
        "test": b" a cat ran \n",
    }
    sums = {f"ptb/{s}.txt": sha(t) for s, t in texts.items()}
    monkeypatch.setattr(sources, "SHA256", {**sources.SHA256, **sums})
    return {f"ptb.{s}.txt": t for s, t in texts.items()}


def test_ptb_download_via_mirror_env_then_cached(server, ptb_files, monkeypatch, tmp_path):
    server.files.update(ptb_files)
    monkeypatch.setenv("MOGLSTM_MIRROR", server.url)
    cfg = DataConfig(corpus="ptb", cache_dir=str(tmp_path / "cache"))
    corpus = load_corpus(cfg)
    assert corpus.train.numel() == 8
    assert leftovers(tmp_path / "cache") == ["ptb", "test.txt", "train.txt", "valid.txt"]
    load_corpus(cfg)
    assert set(server.hits.values()) == {1}  # second load: nothing downloaded again


def test_mirror_argument_and_default_cache(server, ptb_files, monkeypatch):
    server.files.update(ptb_files)
    folder = fetch_corpus("ptb", mirror=server.url.rstrip("/"))
    assert folder == data.default_cache_dir() / "ptb"  # $MOGLSTM_CACHE from conftest
    assert (folder / "valid.txt").read_bytes() == ptb_files["ptb.valid.txt"]


def test_corrupt_cached_file_is_downloaded_again(server, ptb_files, tmp_path):
    server.files.update(ptb_files)
    fetch_corpus("ptb", cache_dir=tmp_path, mirror=server.url)
    (tmp_path / "ptb" / "test.txt").write_bytes(b"garbage")
    fetch_corpus("ptb", cache_dir=tmp_path, mirror=server.url)
    assert (tmp_path / "ptb" / "test.txt").read_bytes() == ptb_files["ptb.test.txt"]
    assert server.hits["ptb.test.txt"] == 2 and server.hits["ptb.train.txt"] == 1


def test_failed_corpus_download_says_how_to_use_a_local_copy(server, ptb_files, tmp_path):
    server.files.update(ptb_files)
    server.files["ptb.valid.txt"] = b" something else \n"
    with pytest.raises(ChecksumError, match="MOGLSTM_DATA") as info:
        fetch_corpus("ptb", cache_dir=tmp_path, mirror=server.url)
    assert "data_dir" in str(info.value)
    assert leftovers(tmp_path / "ptb") == ["train.txt"]  # verified file kept, no temp files
    with pytest.raises(DownloadError, match="MOGLSTM_DATA"):
        fetch_corpus("ptb-char", cache_dir=tmp_path)  # mirror env: a closed port
    assert leftovers(tmp_path / "ptb-char") == []


def test_moglstm_data_without_the_corpus_falls_back_to_download(
    server, ptb_files, tmp_path, monkeypatch
):
    server.files.update(ptb_files)
    (tmp_path / "shared" / "wikitext-2").mkdir(parents=True)
    monkeypatch.setenv("MOGLSTM_DATA", str(tmp_path / "shared"))
    folder = fetch_corpus("ptb", cache_dir=tmp_path / "cache", mirror=server.url)
    assert folder == tmp_path / "cache" / "ptb"


def test_explicit_data_dir_without_the_corpus_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"train\.txt does not exist"):
        fetch_corpus("ptb", data_dir=tmp_path)
    with pytest.raises(ValueError, match="valid names: shakespeare, ptb, ptb-char"):
        fetch_corpus("ptb3")


def test_wikitext_zip_is_unpacked_verified_and_removed(server, tmp_path, monkeypatch):
    texts = {s: f" = {s} = \n \n the {s} text \n".encode() for s in ("train", "valid", "test")}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for s, t in texts.items():
            zf.writestr(f"wikitext-2/wiki.{s}.tokens", t)
    server.files["wikitext-2-v1.zip"] = buf.getvalue()
    sums = {f"wikitext-2/{s}.txt": sha(t) for s, t in texts.items()}
    sums["wikitext-2/wikitext-2-v1.zip"] = sha(buf.getvalue())
    monkeypatch.setattr(sources, "SHA256", {**sources.SHA256, **sums})
    corpus = load_corpus(
        DataConfig(corpus="wikitext-2", cache_dir=str(tmp_path)), mirror=server.url
    )
    expected = "= <unk> = <eos> <eos> the <unk> text <eos>".split()  # valid-only words: <unk>
    assert corpus.vocab.decode(corpus.valid) == expected
    assert leftovers(tmp_path / "wikitext-2") == ["test.txt", "train.txt", "valid.txt"]
    fetch_corpus("wikitext-2", cache_dir=tmp_path, mirror=server.url)
    assert server.hits["wikitext-2-v1.zip"] == 1


def test_wikitext_member_mismatch_leaves_no_member(server, tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for s in ("train", "valid", "test"):
            zf.writestr(f"wikitext-2/wiki.{s}.tokens", b" x \n")
    server.files["wikitext-2-v1.zip"] = buf.getvalue()
    sums = {f"wikitext-2/{s}.txt": sha(b"other") for s in ("train", "valid", "test")}
    sums["wikitext-2/wikitext-2-v1.zip"] = sha(buf.getvalue())
    monkeypatch.setattr(sources, "SHA256", {**sources.SHA256, **sums})
    with pytest.raises(ChecksumError, match="wiki.train.tokens"):
        fetch_corpus("wikitext-2", cache_dir=tmp_path, mirror=server.url)
    assert leftovers(tmp_path / "wikitext-2") == ["wikitext-2-v1.zip"]  # verified archive


def test_enwik8_download_and_split(server, tmp_path, monkeypatch):
    raw = bytes(range(256)) * 4  # 1024 bytes
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", raw)
    server.files["enwik8.zip"] = buf.getvalue()
    sums = {**sources.SHA256, "enwik8/enwik8.zip": sha(buf.getvalue())}
    monkeypatch.setattr(sources, "SHA256", sums)
    enwik8 = replace(sources.SOURCES["enwik8"], split_sizes=(824, 100, 100))
    monkeypatch.setitem(sources.SOURCES, "enwik8", enwik8)
    corpus = load_corpus(DataConfig(corpus="enwik8", cache_dir=str(tmp_path)), mirror=server.url)
    assert corpus.level == "byte" and corpus.test.tolist() == list(raw[924:])
    assert leftovers(tmp_path / "enwik8") == ["enwik8.zip"]


def test_unverified_raw_enwik8_in_cache_is_refused(server, tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("enwik8", b"a" * 30)
    server.files["enwik8.zip"] = buf.getvalue()
    sums = {**sources.SHA256, "enwik8/enwik8.zip": sha(buf.getvalue())}
    monkeypatch.setattr(sources, "SHA256", sums)
    (tmp_path / "enwik8").mkdir()
    (tmp_path / "enwik8" / "enwik8").write_bytes(b"b" * 30)  # dropped there by hand
    with pytest.raises(ChecksumError, match="enwik8"):
        load_corpus(DataConfig(corpus="enwik8", cache_dir=str(tmp_path)), mirror=server.url)
