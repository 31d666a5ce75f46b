"""Tests of download_cifar10 against small archives that each test builds and serves from
an HTTP server on 127.0.0.1 in a thread. No test reaches the internet."""
import hashlib
import io
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from bnnorm.data import (
    CIFAR10_DIRNAME,
    ChecksumMismatchError,
    DatasetFormatError,
    DownloadError,
    UnsafeArchiveError,
    default_cache_dir,
    download_cifar10,
    file_md5,
    load_cifar10,
    write_fake_cifar10,
)

ARCHIVE_NAME = "cifar-10-python.tar.gz"


class ArchiveHandler(BaseHTTPRequestHandler):
    """Serve `server.routes[path] = (body, mode)`. Modes: "ok" sends the body whole;
    "short" announces 1,000 more bytes than it sends; "cut" sends half the body without a
    Content-Length. Every connection closes after one response (HTTP/1.0)."""

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path not in self.server.routes:
            self.send_error(404, "Not Found")
            return
        body, mode = self.server.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        if mode == "ok":
            self.send_header("Content-Length", str(len(body)))
        elif mode == "short":
            self.send_header("Content-Length", str(len(body) + 1000))
        self.end_headers()
        self.wfile.write(body if mode == "ok" else body[:len(body) // 2])

    def log_message(self, format, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    """A local HTTP server; `server.url(path)` is the URL of a route added to `server.routes`."""
    for scheme in ("http", "https", "all"):
        monkeypatch.delenv(f"{scheme}_proxy", raising=False)
        monkeypatch.delenv(f"{scheme.upper()}_PROXY", raising=False)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ArchiveHandler)
    httpd.daemon_threads = True
    httpd.routes = {}
    httpd.requests = []
    httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_address[1]}{path}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def tar_bytes(add_members):
    """Return a gzipped tar archive built by `add_members(tar)`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        add_members(tar)
    return buffer.getvalue()


def cifar10_archive(tmp_path, num_per_batch=2):
    source = write_fake_cifar10(tmp_path / "source" / CIFAR10_DIRNAME, num_per_batch=num_per_batch)
    return tar_bytes(lambda tar: tar.add(source, arcname=CIFAR10_DIRNAME))


def md5_of(body):
    return hashlib.md5(body).hexdigest()


def cache_listing(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# a good archive ----------------------------------------------------------------------------

def test_good_archive_extracts(server, tmp_path):
    body = cifar10_archive(tmp_path)
    server.routes["/" + ARCHIVE_NAME] = (body, "ok")
    cache = tmp_path / "cache"

    path = download_cifar10(cache, url=server.url("/" + ARCHIVE_NAME), md5=md5_of(body),
                            progress=False)

    assert path == cache / CIFAR10_DIRNAME
    X_train, y_train, X_test, y_test, class_names = load_cifar10(path)
    assert X_train.shape == (10, 32, 32, 3)
    assert file_md5(cache / ARCHIVE_NAME) == md5_of(body)
    assert cache_listing(cache) == sorted([ARCHIVE_NAME, CIFAR10_DIRNAME, CIFAR10_DIRNAME + ".md5"])


def test_good_archive_matches_source(server, tmp_path):
    body = cifar10_archive(tmp_path)
    server.routes["/" + ARCHIVE_NAME] = (body, "ok")
    path = download_cifar10(tmp_path / "cache", url=server.url("/" + ARCHIVE_NAME),
                            md5=md5_of(body), progress=False)
    for downloaded, original in zip(load_cifar10(path)[:4],
                                    load_cifar10(tmp_path / "source" / CIFAR10_DIRNAME)[:4]):
        np.testing.assert_array_equal(downloaded, original)


def test_second_call_reuses_extraction(server, tmp_path):
    body = cifar10_archive(tmp_path)
    server.routes["/" + ARCHIVE_NAME] = (body, "ok")
    url = server.url("/" + ARCHIVE_NAME)
    first = download_cifar10(tmp_path / "cache", url=url, md5=md5_of(body), progress=False)
    # Without the archive and the route, only the verified extraction can satisfy the call.
    (tmp_path / "cache" / ARCHIVE_NAME).unlink()
    del server.routes["/" + ARCHIVE_NAME]
    second = download_cifar10(tmp_path / "cache", url=url, md5=md5_of(body), progress=False)
    assert first == second
    assert server.requests == ["/" + ARCHIVE_NAME]
    assert (second / "batches.meta").is_file()


def test_changed_md5_invalidates_extraction(server, tmp_path):
    old_body = cifar10_archive(tmp_path / "old")
    new_body = cifar10_archive(tmp_path / "new", num_per_batch=3)
    url = server.url("/" + ARCHIVE_NAME)
    server.routes["/" + ARCHIVE_NAME] = (old_body, "ok")
    download_cifar10(tmp_path / "cache", url=url, md5=md5_of(old_body), progress=False)

    server.routes["/" + ARCHIVE_NAME] = (new_body, "ok")
    path = download_cifar10(tmp_path / "cache", url=url, md5=md5_of(new_body), progress=False)

    assert load_cifar10(path)[0].shape == (15, 32, 32, 3)
    assert len(server.requests) == 2


def test_uppercase_md5_accepted(server, tmp_path):
    body = cifar10_archive(tmp_path)
    server.routes["/" + ARCHIVE_NAME] = (body, "ok")
    path = download_cifar10(tmp_path / "cache", url=server.url("/" + ARCHIVE_NAME),
                            md5=md5_of(body).upper(), progress=False)
    assert (path / "batches.meta").is_file()


def test_cached_archive_skips_download(server, tmp_path):
    body = cifar10_archive(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ARCHIVE_NAME).write_bytes(body)
    path = download_cifar10(cache, url=server.url("/" + ARCHIVE_NAME), md5=md5_of(body),
                            progress=False)
    assert (path / "batches.meta").is_file()
    assert server.requests == []


def test_damaged_cached_archive_downloaded_again(server, tmp_path):
    body = cifar10_archive(tmp_path)
    server.routes["/" + ARCHIVE_NAME] = (body, "ok")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ARCHIVE_NAME).write_bytes(body[:100])
    download_cifar10(cache, url=server.url("/" + ARCHIVE_NAME), md5=md5_of(body), progress=False)
    assert server.requests == ["/" + ARCHIVE_NAME]
    assert file_md5(cache / ARCHIVE_NAME) == md5_of(body)


def test_unmarked_extraction_replaced(server, tmp_path):
    body = cifar10_archive(tmp_path)
    server.routes["/" + ARCHIVE_NAME] = (body, "ok")
    cache = tmp_path / "cache"
    (cache / CIFAR10_DIRNAME).mkdir(parents=True)
    (cache / CIFAR10_DIRNAME / "leftover").write_text("from an interrupted extraction")
    path = download_cifar10(cache, url=server.url("/" + ARCHIVE_NAME), md5=md5_of(body),
                            progress=False)
    assert not (path / "leftover").exists()
    assert (path / "batches.meta").is_file()


def test_default_cache_dir_from_env(server, tmp_path, monkeypatch):
    body = cifar10_archive(tmp_path)
    server.routes["/" + ARCHIVE_NAME] = (body, "ok")
    monkeypatch.setenv("BNNORM_CACHE_DIR", str(tmp_path / "env-cache"))
    path = download_cifar10(url=server.url("/" + ARCHIVE_NAME), md5=md5_of(body), progress=False)
    assert path == tmp_path / "env-cache" / CIFAR10_DIRNAME


def test_default_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BNNORM_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "bnnorm"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "bnnorm"

    monkeypatch.setenv("BNNORM_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"


def test_progress_bar_on_stderr(server, tmp_path, capsys):
    body = cifar10_archive(tmp_path)
    server.routes["/" + ARCHIVE_NAME] = (body, "ok")
    download_cifar10(tmp_path / "cache", url=server.url("/" + ARCHIVE_NAME), md5=md5_of(body),
                     progress=True)
    err = capsys.readouterr().err
    assert ARCHIVE_NAME in err
    assert "100%" in err


# failed downloads --------------------------------------------------------------------------

def test_wrong_checksum(server, tmp_path):
    body = cifar10_archive(tmp_path)
    server.routes["/" + ARCHIVE_NAME] = (body, "ok")
    url = server.url("/" + ARCHIVE_NAME)
    cache = tmp_path / "cache"
    expected = "0123456789abcdef0123456789abcdef"

    with pytest.raises(ChecksumMismatchError) as info:
        download_cifar10(cache, url=url, md5=expected, progress=False)

    message = str(info.value)
    assert url in message
    assert f"expected MD5 {expected}" in message
    assert f"got {md5_of(body)}" in message
    assert "Try again" in message
    assert cache_listing(cache) == []


def test_content_length_larger_than_body(server, tmp_path):
    body = cifar10_archive(tmp_path)
    server.routes["/" + ARCHIVE_NAME] = (body, "short")
    url = server.url("/" + ARCHIVE_NAME)
    cache = tmp_path / "cache"

    with pytest.raises(DownloadError) as info:
        download_cifar10(cache, url=url, md5=md5_of(body), progress=False)

    assert url in str(info.value)
    assert f"received {len(body) // 2} of {len(body) + 1000} bytes" in str(info.value)
    assert cache_listing(cache) == []


def test_cut_off_without_length(server, tmp_path):
    body = cifar10_archive(tmp_path)
    server.routes["/" + ARCHIVE_NAME] = (body, "cut")
    cache = tmp_path / "cache"

    with pytest.raises(ChecksumMismatchError) as info:
        download_cifar10(cache, url=server.url("/" + ARCHIVE_NAME), md5=md5_of(body),
                         progress=False)

    assert f"got {md5_of(body[:len(body) // 2])}" in str(info.value)
    assert cache_listing(cache) == []


def test_http_404(server, tmp_path):
    url = server.url("/missing.tar.gz")
    with pytest.raises(DownloadError) as info:
        download_cifar10(tmp_path / "cache", url=url, md5="0" * 32, progress=False)
    assert url in str(info.value)
    assert "404" in str(info.value)
    assert cache_listing(tmp_path / "cache") == []


def test_connection_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{ARCHIVE_NAME}"

    with pytest.raises(DownloadError) as info:
        download_cifar10(tmp_path / "cache", url=url, md5="0" * 32, progress=False)

    assert url in str(info.value)
    assert "Check the network connection" in str(info.value)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"url": "notaurl"}, "url='notaurl' is invalid; expected an http://, https:// or file://"),
    ({"url": "ftp://127.0.0.1/x.tar.gz"}, "url='ftp://127.0.0.1/x.tar.gz' is invalid"),
    ({"timeout": 0}, "timeout=0 is invalid"),
    ({"timeout": -1}, "timeout=-1 is invalid"),
])
def test_invalid_download_arguments(tmp_path, kwargs, fragment):
    # A local file URL by default, so that no check can reach the network.
    arguments = {"url": (tmp_path / "absent.tar.gz").as_uri(), **kwargs}
    with pytest.raises(ValueError, match=fragment):
        download_cifar10(tmp_path / "cache", **arguments)
    assert not (tmp_path / "cache").exists()


def test_cache_dir_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError, match="cache_dir .*afile.* is a file"):
        download_cifar10(tmp_path / "afile", url=(tmp_path / "x.tar.gz").as_uri())


def test_invalid_md5_argument(tmp_path):
    with pytest.raises(ValueError, match="32 hexadecimal digits"):
        download_cifar10(tmp_path / "cache", md5="c58f30108f718f92")


# unsafe and wrong archives -----------------------------------------------------------------

def add_file(tar, name, content=b"payload"):
    info = tarfile.TarInfo(name)
    info.size = len(content)
    tar.addfile(info, io.BytesIO(content))


def add_special(tar, name, kind, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    tar.addfile(info)


UNSAFE_MEMBERS = {
    "dot-dot": (lambda tar: add_file(tar, f"{CIFAR10_DIRNAME}/../../escaped"), "'..' component"),
    "leading dot-dot": (lambda tar: add_file(tar, "../escaped"), "'..' component"),
    "absolute": (lambda tar: add_file(tar, "/tmp/bnnorm-escaped"), "absolute path"),
    "symlink out": (lambda tar: add_special(tar, f"{CIFAR10_DIRNAME}/link", tarfile.SYMTYPE,
                                            "../../escaped"), "is a link to '../../escaped'"),
    "absolute symlink": (lambda tar: add_special(tar, f"{CIFAR10_DIRNAME}/link", tarfile.SYMTYPE,
                                                 "/etc/passwd"), "is a link to '/etc/passwd'"),
    "hard link out": (lambda tar: add_special(tar, f"{CIFAR10_DIRNAME}/link", tarfile.LNKTYPE,
                                              "../escaped"), "is a link"),
    "char device": (lambda tar: add_special(tar, f"{CIFAR10_DIRNAME}/tty", tarfile.CHRTYPE),
                    "device file"),
    "fifo": (lambda tar: add_special(tar, f"{CIFAR10_DIRNAME}/pipe", tarfile.FIFOTYPE),
             "device file, FIFO"),
}


@pytest.mark.parametrize("case", list(UNSAFE_MEMBERS))
def test_unsafe_member_rejected(server, tmp_path, case):
    add_unsafe, fragment = UNSAFE_MEMBERS[case]
    source = write_fake_cifar10(tmp_path / "source" / CIFAR10_DIRNAME, num_per_batch=1)

    def add_members(tar):
        tar.add(source, arcname=CIFAR10_DIRNAME)
        add_unsafe(tar)

    body = tar_bytes(add_members)
    server.routes["/" + ARCHIVE_NAME] = (body, "ok")
    cache = tmp_path / "deep" / "cache"

    with pytest.raises(UnsafeArchiveError) as info:
        download_cifar10(cache, url=server.url("/" + ARCHIVE_NAME), md5=md5_of(body),
                         progress=False)

    assert fragment in str(info.value)
    assert str(cache / ARCHIVE_NAME) in str(info.value)
    assert not (tmp_path / "escaped").exists()
    assert not (tmp_path / "deep" / "escaped").exists()
    assert cache_listing(cache) == [ARCHIVE_NAME]


def test_dot_dot_member_writes_nothing(server, tmp_path):
    def add_members(tar):
        add_file(tar, f"{CIFAR10_DIRNAME}/batches.meta")
        add_file(tar, "../outside.txt", b"must not be written")

    body = tar_bytes(add_members)
    server.routes["/" + ARCHIVE_NAME] = (body, "ok")
    cache = tmp_path / "cache"

    with pytest.raises(UnsafeArchiveError, match="'../outside.txt'"):
        download_cifar10(cache, url=server.url("/" + ARCHIVE_NAME), md5=md5_of(body),
                         progress=False)

    assert not (tmp_path / "outside.txt").exists()
    assert not (cache / CIFAR10_DIRNAME).exists()
    assert not (cache / (CIFAR10_DIRNAME + ".md5")).exists()


def test_archive_without_cifar_dir(server, tmp_path):
    body = tar_bytes(lambda tar: add_file(tar, "other/readme.txt"))
    server.routes["/" + ARCHIVE_NAME] = (body, "ok")
    cache = tmp_path / "cache"
    expected = f"does not contain {CIFAR10_DIRNAME}/batches.meta"
    with pytest.raises(DatasetFormatError, match=expected):
        download_cifar10(cache, url=server.url("/" + ARCHIVE_NAME), md5=md5_of(body),
                         progress=False)
    assert cache_listing(cache) == [ARCHIVE_NAME]


def test_not_a_tar_archive(server, tmp_path):
    body = b"<html>a login page, not an archive</html>"
    server.routes["/" + ARCHIVE_NAME] = (body, "ok")
    with pytest.raises(DatasetFormatError, match="is not a readable tar archive"):
        download_cifar10(tmp_path / "cache", url=server.url("/" + ARCHIVE_NAME), md5=md5_of(body),
                         progress=False)
