"""Lease files: one owner per task, expiry and renewal, race-safe takeover of a dead owner's task.

Leases here are short (0.2 to 1 s) so expiry is quick to reach; the waits are multiples of
the renewal interval so a shared, slow CPU does not make a live lease look dead.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from crossgap_fast.pipeline import leases as leases_mod
from crossgap_fast.pipeline.leases import Leases, is_live, lease_path, read_lease


def _no_renewal(leases: Leases) -> Leases:
    """A worker that stops renewing right away (as if it hung or died): no renewal thread."""
    leases._start = lambda: None
    return leases


def _dead_lease(folder, task: str, owner: str = "dead-worker") -> None:
    """A lease left by a worker that died a while ago."""
    folder.mkdir(parents=True, exist_ok=True)
    lease_path(folder, task).write_text(json.dumps(
        {"task": task, "owner": owner, "host": "elsewhere", "pid": 1, "acquired": time.time() - 100,
         "renewed": time.time() - 90, "expires": time.time() - 30}))


def _leftovers(folder) -> list[str]:
    """Files in the lease folder other than the lease files themselves."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lease"))


def test_a_task_has_one_owner_until_released(tmp_path):
    folder = tmp_path / "leases"
    a, b = Leases(folder, "worker-a", seconds=30), Leases(folder, "worker-b", seconds=30)
    try:
        assert a.acquire("shard-00003")
        assert not b.acquire("shard-00003")
        assert b.acquire("shard-00004")  # other tasks stay free
        holder = b.holder("shard-00003")
        assert holder["owner"] == "worker-a" and holder["task"] == "shard-00003" and is_live(holder)
        assert a.held() == ["shard-00003"] and b.held() == ["shard-00004"]
        assert a.acquire("shard-00003")  # the owner asking again keeps it
        a.release("shard-00003")
        assert not lease_path(folder, "shard-00003").exists() and a.held() == []
        assert b.acquire("shard-00003")
        assert b.holder("shard-00003")["owner"] == "worker-b"
        a.release("shard-00003")  # releasing what another worker holds changes nothing
        assert b.holder("shard-00003")["owner"] == "worker-b"
    finally:
        a.close()
        b.close()
    assert list(folder.iterdir()) == []  # close released every held lease, no temporary files


def test_an_expired_lease_is_taken_over(tmp_path):
    folder = tmp_path / "leases"
    stalled = _no_renewal(Leases(folder, "stalled", seconds=0.2))
    other = Leases(folder, "other", seconds=30)
    try:
        assert stalled.acquire("shard-00000")
        assert not other.acquire("shard-00000")  # still live
        time.sleep(0.3)
        assert other.holder("shard-00000") is None  # expired: nobody holds it
        assert other.acquire("shard-00000")
        assert read_lease(lease_path(folder, "shard-00000"))["owner"] == "other"
        # the stalled worker wakes up: it finds its lease gone and does not overwrite it
        stalled.renew()
        assert stalled.lost == ["shard-00000"] and stalled.held() == []
        assert read_lease(lease_path(folder, "shard-00000"))["owner"] == "other"
        stalled.release("shard-00000")
        assert read_lease(lease_path(folder, "shard-00000"))["owner"] == "other"
    finally:
        stalled.close()
        other.close()


def test_a_dead_workers_lease_and_a_damaged_one_are_broken(tmp_path):
    folder = tmp_path / "leases"
    _dead_lease(folder, "setup")
    w = Leases(folder, "w", seconds=30)
    try:
        assert w.acquire("setup") and w.holder("setup")["owner"] == "w"
        # a lease file that is no lease: young, it may be a writer's moment; old, it is broken
        path = lease_path(folder, "calibration")
        path.write_text("{not json")
        assert not w.acquire("calibration")
        old = time.time() - 60
        os.utime(path, (old, old))
        assert w.acquire("calibration") and w.holder("calibration")["owner"] == "w"
        assert _leftovers(folder) == []
    finally:
        w.close()


def test_a_renewed_lease_is_never_taken(tmp_path):
    folder = tmp_path / "leases"
    owner = Leases(folder, "owner", seconds=1.0)  # renewed every 0.25 s by its thread
    other = Leases(folder, "other", seconds=30)
    try:
        assert owner.acquire("shard-00001")
        first = read_lease(lease_path(folder, "shard-00001"))
        deadline = time.time() + 2.5  # 2.5 lease times
        tries = 0
        while time.time() < deadline:
            assert not other.acquire("shard-00001")
            tries += 1
            time.sleep(0.05)
        now = read_lease(lease_path(folder, "shard-00001"))
        assert now["owner"] == "owner" and now["expires"] > first["expires"] + 1.0  # renewed
        assert now["acquired"] == first["acquired"]
        assert tries > 10 and owner.lost == []
    finally:
        owner.close()
        other.close()


def test_breaking_does_not_remove_a_lease_renewed_meanwhile(tmp_path, monkeypatch):
    """The owner renews between the breaker's look (expired) and its removal: the breaker
    must leave the renewed lease alone and report failure."""
    folder = tmp_path / "leases"
    slow = _no_renewal(Leases(folder, "slow-owner", seconds=0.2))
    breaker = Leases(folder, "breaker", seconds=30)
    try:
        assert slow.acquire("shard-00002")
        time.sleep(0.3)
        path = lease_path(folder, "shard-00002")
        stale = read_lease(path)
        assert not is_live(stale)

        # 1. _break called with what the breaker saw before the renewal
        slow.renew()
        assert breaker._break(path, stale) is False
        assert read_lease(path)["owner"] == "slow-owner" and is_live(read_lease(path))

        # 2. the whole acquire, with the renewal landing right after the breaker's read
        time.sleep(0.3)
        assert not is_live(read_lease(path))
        real_read = leases_mod.read_lease
        calls = []

        def read_then_owner_renews(p):
            got = real_read(p)
            if p == path and not calls:
                calls.append(got)
                slow.renew()
            return got

        monkeypatch.setattr(leases_mod, "read_lease", read_then_owner_renews)
        assert breaker.acquire("shard-00002") is False
        monkeypatch.setattr(leases_mod, "read_lease", real_read)
        assert calls and not is_live(calls[0])  # the breaker did see an expired lease
        lease = read_lease(path)
        assert lease["owner"] == "slow-owner" and is_live(lease)
        assert slow.held() == ["shard-00002"] and slow.lost == []
        assert _leftovers(folder) == []
    finally:
        slow.close()
        breaker.close()


def test_a_release_is_not_undone_by_a_renewal_in_flight(tmp_path, monkeypatch):
    """The renewal thread reads the lease, then the worker releases it: the renewal must not
    write the released lease back (it would block the task for a lease time)."""
    folder = tmp_path / "leases"
    w = _no_renewal(Leases(folder, "w", seconds=60))
    assert w.acquire("setup")
    path = lease_path(folder, "setup")
    real_read = leases_mod.read_lease
    read_by_renewal, released = threading.Event(), threading.Event()

    def slow_read(p):
        got = real_read(p)
        if threading.current_thread().name == "renewal" and p == path:
            read_by_renewal.set()
            released.wait(0.5)  # with a correct lock the release waits for this renewal
        return got

    monkeypatch.setattr(leases_mod, "read_lease", slow_read)
    renewal = threading.Thread(target=w.renew, name="renewal")
    renewal.start()
    assert read_by_renewal.wait(5)
    releaser = threading.Thread(target=lambda: (w.release("setup"), released.set()))
    releaser.start()
    renewal.join(5)
    releaser.join(5)
    assert not renewal.is_alive() and not releaser.is_alive()
    assert not path.exists(), read_lease(path)
    assert w.held() == [] and w.lost == []


@pytest.mark.parametrize("start", ["free", "expired"])
def test_racing_workers_one_wins(tmp_path, start):
    """Eight threads, each its own worker, claim one task at the same moment (a free task, or
    one whose lease expired: breakers racing each other), over many rounds."""
    folder = tmp_path / "leases"
    n, rounds = 8, 60
    workers = [_no_renewal(Leases(folder, f"w{i}", seconds=30)) for i in range(n)]
    for r in range(rounds):
        task = f"shard-{r:05d}"
        if start == "expired":
            _dead_lease(folder, task)
        gate = threading.Barrier(n)
        won = [False] * n

        def claim(i):
            gate.wait()
            won[i] = workers[i].acquire(task)

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [f"w{i}" for i in range(n) if won[i]]
        assert len(winners) == 1, (r, winners)
        assert read_lease(lease_path(folder, task))["owner"] == winners[0]
    assert _leftovers(folder) == []


def test_a_guard_left_by_a_dead_worker_does_not_block_the_task(tmp_path, monkeypatch):
    folder = tmp_path / "leases"
    _dead_lease(folder, "shard-00009")
    guard = leases_mod.guard_path(lease_path(folder, "shard-00009"))
    guard.write_text("a worker that is changing this lease")
    monkeypatch.setattr(leases_mod, "GUARD_WAIT_SECONDS", 0.05)
    w = Leases(folder, "w", seconds=30)
    try:
        assert not w.acquire("shard-00009")  # a young guard: its worker is mid-change
        assert read_lease(lease_path(folder, "shard-00009"))["owner"] == "dead-worker"
        old = time.time() - 2 * leases_mod.GUARD_STALE_SECONDS
        os.utime(guard, (old, old))
        assert w.acquire("shard-00009") and w.holder("shard-00009")["owner"] == "w"
        assert _leftovers(folder) == []
    finally:
        w.close()


def test_a_lease_of_a_gone_process_on_this_host_is_taken_at_once(tmp_path):
    """After a crash, a resume on the same host need not wait out the lease time: the lease
    names this host and a process that no longer exists."""
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    folder = tmp_path / "leases"
    folder.mkdir()
    now = time.time()
    lease_path(folder, "shard-00000").write_text(json.dumps(
        {"task": "shard-00000", "owner": "crashed", "host": socket.gethostname(), "pid": int(gone.stdout),
         "acquired": now, "renewed": now, "expires": now + 600}))
    lease_path(folder, "shard-00001").write_text(json.dumps(
        {"task": "shard-00001", "owner": "elsewhere", "host": "another-host", "pid": int(gone.stdout),
         "acquired": now, "renewed": now, "expires": now + 600}))
    me = Leases(folder, "me", seconds=60)
    try:
        assert me.acquire("shard-00000")  # live by its clock, but its process is gone
        assert not me.acquire("shard-00001")  # another host's process cannot be checked: wait
        me.close()
        assert not me.acquire("shard-00002")  # nothing is taken after close
    finally:
        me.close()
