"""Where the repository is, for tests that run its commands or read its configs."""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def fake_subprocess(run, seen: list):
    """A stand-in for a launcher's `subprocess` module: `run` answers subprocess.run, Popen only
    records its command in `seen` and exits 0."""
    import subprocess
    import types

    class FakePopen:
        def __init__(self, cmd):
            seen.append(cmd)

        def wait(self):
            return 0

    return types.SimpleNamespace(run=run, Popen=FakePopen,
                                 CalledProcessError=subprocess.CalledProcessError)
