"""`sidecar demo`: the README's first command shows every kind of credential accepted and refused."""

from __future__ import annotations

import subprocess
import sys


def test_demo_self_test_passes_and_prints_curl_lines():
    """`sidecar demo --self-test` sends each printed curl line and every answer is the expected one."""
    result = subprocess.run([sys.executable, "-m", "sidecar", "demo", "--self-test"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert out.count("curl ") >= 15
    assert "UNEXPECTED" not in out
    for shown in ("X-Client-Token", "?key=ab_", "?token=good-", "Authorization: Bearer", "/_sidecar/keys"):
        assert shown in out
