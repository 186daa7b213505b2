"""`bdh explore` on the command line: one-line errors before anything is served."""

import socket

import pytest

from bdh.cli import main
from bdh.explore import bind, is_loopback
from tests.explore.helpers import tiny_checkpoint
from tests.helpers import one_line_error


@pytest.mark.parametrize("extra, words", [
    (["--port", "70000"], "--port must lie in 0..65535"),
    (["--max-chars", "0"], "max-chars must be at least 1"),
    (["--max-concurrent", "-1"], "max-concurrent must be at least 1"),
    (["--port", "x"], "invalid int value"),
])
def test_bad_options_end_in_one_line(tmp_path, capsys, extra, words):
    assert main(["explore", "--ckpt", str(tmp_path), "--no-browser", *extra]) == 2
    one_line_error(capsys, words)


def test_bad_checkpoints_end_in_one_line(tmp_path, capsys):
    assert main(["explore", "--ckpt", str(tmp_path / "none"), "--no-browser"]) == 2
    one_line_error(capsys, "none")
    ckpt = str(tiny_checkpoint(tmp_path / "tiny"))
    assert main(["explore", "--ckpt", ckpt, "--ckpt", ckpt, "--ckpt", ckpt, "--no-browser"]) == 2
    one_line_error(capsys, "one or two checkpoints")


def test_a_port_in_use_ends_in_one_line(tmp_path, capsys):
    taken = bind("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        ckpt = str(tiny_checkpoint(tmp_path / "tiny"))
        assert main(["explore", "--ckpt", ckpt, "--port", str(port), "--no-browser", "--device", "cpu"]) == 2
        one_line_error(capsys, f"cannot listen on 127.0.0.1:{port}", "--port")
    finally:
        taken.close()


def test_only_loopback_addresses_count_as_local():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    sock = bind("127.0.0.1", 0)
    assert sock.family == socket.AF_INET and sock.getsockname()[1] > 0
    sock.close()
