"""train.py on a disk that stalls mid-checkpoint: the Nth time a file named last.ckpt* is opened for writing in a
checkpoints/ directory (STALL_AT_WRITE=N), its writes stop after the first megabyte, STALL_MARKER is touched and the
process sleeps, so a test can SIGKILL the run while a checkpoint is half on disk, wherever the checkpoint IO puts the
bytes: a staging file next to last.ckpt, or last.ckpt itself."""

import builtins
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STALL_AFTER_BYTES = 1 << 20


class StallingFile:
    def __init__(self, file, marker: Path):
        self.file, self.marker, self.written = file, marker, 0

    def write(self, data) -> int:
        if self.written + len(data) > STALL_AFTER_BYTES:
            self.file.write(data[: STALL_AFTER_BYTES - self.written])
            self.file.flush()
            self.marker.touch()
            time.sleep(3600)
        self.written += len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


real_open = builtins.open
opened_for_writing = 0


def stalling_open(file, mode="r", *args, **kwargs):
    global opened_for_writing
    handle = real_open(file, mode, *args, **kwargs)
    if isinstance(file, (str, os.PathLike)) and "w" in mode:
        path = Path(file)
        if path.parent.name == "checkpoints" and path.name.startswith("last.ckpt"):
            opened_for_writing += 1
            if opened_for_writing == int(os.environ["STALL_AT_WRITE"]):
                return StallingFile(handle, Path(os.environ["STALL_MARKER"]))
    return handle


builtins.open = stalling_open
shutil._USE_CP_SENDFILE = False  # a file copied into place goes through file objects too, so it stalls like a write

if __name__ == "__main__":
    entry = ROOT / "train.py"
    exec(compile(entry.read_text(), str(entry), "exec"), {"__name__": "__main__", "__file__": str(entry)})
