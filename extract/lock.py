"""A per-shard lock file, so two processes never extract the same shard into one folder.

`<out>/lock-part-IIIII-of-NNNNN` holds `{"host", "pid", "pid_start", "started", "argv"}`. It is created
atomically (written to a private temporary file, then hard-linked to the lock name, which fails when the
name exists; `O_CREAT | O_EXCL` where the file system has no hard links), so of two processes started at
once exactly one gets it and the lock is never seen half-written. It is removed when the run ends,
normally or by an error, Ctrl-C or SIGTERM (the run turns SIGTERM into an exception). A `kill -9` or a
crashed host leaves it behind:

* same host, the process is gone (or its pid now belongs to a process started later): the lock is stale
  and the next run takes it over, with a printed notice;
* another host: whether that process still runs cannot be known from here, so the run is refused with a
  message naming the holder and saying to delete the file once no process runs that shard.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from extract import ExtractError


def _pid_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux `/proc`), to tell a reused pid apart."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, pid_start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    except OSError:
        return True
    now = _pid_start(pid)
    return pid_start is None or now is None or now == pid_start


def live_holder(path: Path) -> dict | None:
    """The holder of another lock file when its process may still run (another host, or alive here); None for a
    stale, unreadable or vanished one (the run that takes that shard deals with it)."""
    try:
        holder = json.loads(Path(path).read_text())
        pid = int(holder["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if holder.get("host") != socket.gethostname() or _alive(pid, holder.get("pid_start")):
        return holder
    return None


class ShardLock:
    """Held from `acquire()` to `release()` (or the `with` block)."""

    def __init__(self, path: str | Path, shard: tuple[int, int]):
        self.path = Path(path)
        self.shard = shard
        self.content = json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "pid_start": _pid_start(os.getpid()),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "argv": sys.argv,
            }
        )
        self.held = False

    def acquire(self) -> ShardLock:
        for _ in range(3):
            if self._create():
                self.held = True
                return self
            holder = self._read()
            if holder is None:
                time.sleep(0.2)  # another process is creating or removing it; look again
                continue
            self._refuse_or_take_over(holder)
        raise ExtractError(f"{self.path}: could not take the lock of shard {self._shard()}; delete the file and rerun")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if self.path.read_text() == self.content:  # never remove a lock another process took over
                self.path.unlink()
        except OSError:
            pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def _shard(self) -> str:
        return f"{self.shard[0]}/{self.shard[1]}"

    def _create(self) -> bool:
        tmp = self.path.with_name(f".{self.path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        try:
            tmp.write_text(self.content)
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links here: exclusive create
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as f:
                    f.write(self.content)
                return True
        except OSError as e:
            raise ExtractError(f"{self.path}: cannot create the shard lock ({e.strerror or e})") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self) -> dict | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ExtractError(f"{self.path}: cannot read the shard lock ({e.strerror or e})") from None
        try:
            holder = json.loads(text)
            holder["pid"] = int(holder["pid"])
            holder["_text"] = text
            return holder
        except (ValueError, KeyError, TypeError):
            raise ExtractError(
                f"{self.path}: not a shard lock this extractor wrote; if no process runs shard {self._shard()} "
                "into this folder, delete the file and rerun"
            ) from None

    def _refuse_or_take_over(self, holder: dict) -> None:
        who = f"pid {holder['pid']} on host {holder.get('host')!r} (since {holder.get('started')})"
        if holder.get("host") != socket.gethostname():
            raise ExtractError(
                f"{self.path}: shard {self._shard()} is held by {who}; this host cannot tell whether that process "
                "still runs: if none runs this shard any more, delete the file and rerun"
            )
        if _alive(holder["pid"], holder.get("pid_start")):
            raise ExtractError(
                f"{self.path}: shard {self._shard()} is already being extracted into this folder by {who}; "
                "wait for it to finish, or stop it and rerun (another shard needs another --shard I/N)"
            )
        # Stale: move it aside under a private name, check it is still the stale one, then retry the create.
        aside = self.path.with_name(f".{self.path.name}.stale.{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return  # someone else removed it first
        if aside.read_text() != holder["_text"]:  # another process took it over meanwhile: put theirs back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        print(
            f"note: {self.path}: taking over the stale lock of {who}, which no longer runs",
            file=sys.stderr,
            flush=True,
        )
