"""The demo (`python -m fastrpb`) runs, checks itself and prints its table."""

from fastrpb.__main__ import main


def test_demo_runs_and_prints_the_comparison(capsys):
    assert main(["demo", "--length", "2048", "--heads", "2", "--features", "8", "--repeats", "1", "--check-length", "64"]) == 0
    out = capsys.readouterr().out
    assert "[OK]" in out
    assert "FastRPB time" in out
    assert "dense time" in out
    assert "2,048" in out
    assert "1,024" in out
