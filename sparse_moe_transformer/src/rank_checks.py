"""Checks that keep a multi-process (torchrun) training run honest.

    process_group_timeout()         the bound on every collective: --dist-timeout, else 5 minutes
    check_same_inputs(rt, tok, data) every rank has the same tokenizer and token data, before step 1
    RankHeartbeat                    each rank counts its liveness in the rendezvous store, so a
                                     collective that times out can name the rank(s) that stopped

Without a bound, a rank that stops (paused, swapped out, a dead GPU) leaves the others waiting in
their next collective for gloo's default of 30 minutes, silently. Without the input check, ranks
launched with different data files each train their own tokenizer and the gradients they average
mean nothing, also silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from datetime import timedelta

import numpy as np
import torch.distributed as torch_dist

TIMEOUT_ENV = "MOE_DIST_TIMEOUT_S"  # --dist-timeout sets it; torchrun users may set it too
DEFAULT_TIMEOUT_S = 300.0  # long enough for a slow evaluation or save on rank 0, short enough to notice
HEARTBEAT_S = 0.5  # seconds between two heartbeats of a rank
STORE_TIMEOUT_S = 10.0  # the heartbeat's bound on one call to the rendezvous store


class RanksStopped(RuntimeError):
    """A collective timed out or lost its peer: another rank stopped answering."""


def is_collective_failure(err: Exception) -> bool:
    """True for the errors of a collective whose peer stopped: a timeout or a closed connection."""
    if isinstance(err, torch_dist.DistError):
        return True
    text = str(err)
    return any(mark in text for mark in ("gloo", "NCCL", "Timed out", "timed out", "Connection closed"))


def process_group_timeout() -> timedelta:
    """The timeout of init_process_group and every collective after it."""
    seconds = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV}={seconds}: the collective timeout must be positive (seconds)")
    return timedelta(seconds=seconds)


# ---------------------------------------------------------------------------------------------
# The same inputs on every rank
# ---------------------------------------------------------------------------------------------


def tokens_fingerprint(tokens: np.ndarray, samples: int = 64, chunk: int = 4096) -> str:
    """BLAKE2b of the length, dtype and `samples` evenly spaced chunks of a token stream.

    Sampled rather than whole: hashing every token of a TinyStories-sized stream (~1 GB) would cost
    seconds per run, while two different corpora or tokenizers differ in (almost) every chunk."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{len(tokens)}:{tokens.dtype}".encode())
    starts = np.linspace(0, max(len(tokens) - chunk, 0), num=samples, dtype=np.int64)
    for start in np.unique(starts):
        digest.update(np.ascontiguousarray(tokens[start : start + chunk]).tobytes())
    return digest.hexdigest()


def input_fingerprints(tokenizer, data) -> dict[str, str]:
    """{"tokenizer", "train data", "validation data"} -> a short hash of each."""
    state = json.dumps(tokenizer.to_state(), sort_keys=True, default=str).encode()
    return {
        "tokenizer": hashlib.blake2b(state, digest_size=8).hexdigest(),
        "train data": tokens_fingerprint(data.train_tokens),
        "validation data": tokens_fingerprint(data.valid_tokens),
    }


def check_same_inputs(rt, tokenizer, data) -> None:
    """Every rank compares its tokenizer and token data with rank 0's; a mismatch is the same one-line
    ValueError on every rank (so none of them is left waiting in a collective)."""
    mine = input_fingerprints(tokenizer, data)
    everyone = [None] * rt.world_size
    torch_dist.all_gather_object(everyone, mine)
    differ = {
        rank: [name for name in mine if fingerprints[name] != everyone[0][name]]
        for rank, fingerprints in enumerate(everyone)
    }
    differ = {rank: names for rank, names in differ.items() if names}
    if differ:
        listed = "; ".join(f"rank {rank}: {', '.join(names)}" for rank, names in sorted(differ.items()))
        raise ValueError(
            f"the ranks do not share their inputs, which differ from rank 0's ({listed}); this is rank "
            f"{rt.rank}: launch every rank with the same --dataset/--data-files, --tokenizer, --vocab-size "
            "and --seed, on the same files"
        )


# ---------------------------------------------------------------------------------------------
# Which rank stopped
# ---------------------------------------------------------------------------------------------


class RankHeartbeat:
    """A daemon thread adding 1 to the key heartbeat/RANK of the rendezvous store every HEARTBEAT_S.

    A rank that is paused, killed or stuck outside Python stops counting; `stopped_ranks` compares the
    counters of every rank over a few heartbeats. The store is torchrun's (or rank 0's under a manual
    launch), reached through its own client so the training thread's process group is never touched."""

    PREFIX = "moe-heartbeat/"

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.address = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        self.enabled = world_size > 1 and all(self.address)
        self._stop = threading.Event()
        self._thread = None

    def _client(self, timeout_s: float):
        host, port = self.address
        return torch_dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s))

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._beat, name="moe-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        try:
            store = self._client(timeout_s=STORE_TIMEOUT_S)
            while not self._stop.wait(HEARTBEAT_S):
                store.add(f"{self.PREFIX}{self.rank}", 1)
        except Exception:  # the store went away (its host ended): nothing left to report to
            return

    def __exit__(self, *exc):
        # Wait for the thread to leave: a daemon thread still inside the store's C++ call when the
        # interpreter exits is ended by a forced unwind through that call, which aborts the process
        # ("terminate called without an active exception", SIGABRT) after a finished run.
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=STORE_TIMEOUT_S + HEARTBEAT_S)
        return False

    def stopped_ranks(self) -> list[int] | None:
        """The ranks whose heartbeat did not move over 4 heartbeats; None when the store does not answer."""
        try:
            store = self._client(timeout_s=5)
            keys = [f"{self.PREFIX}{rank}" for rank in range(self.world_size)]
            before = [store.add(key, 0) for key in keys]
            time.sleep(4 * HEARTBEAT_S)
            after = [store.add(key, 0) for key in keys]
        except Exception:
            return None
        return [rank for rank in range(self.world_size) if after[rank] == before[rank] and rank != self.rank]

    def explain(self, err: Exception, step: int) -> RanksStopped:
        """One line: which rank(s) stopped, what timed out, and what to do."""
        timeout = process_group_timeout().total_seconds()
        if not self.enabled:
            who = "another rank stopped answering"
        else:
            stopped = self.stopped_ranks()
            if stopped is None:
                who = "the rendezvous store does not answer: rank 0 (or torchrun's agent) stopped"
            elif stopped:
                ranks = ", ".join(map(str, stopped))
                who = f"rank{'s' if len(stopped) > 1 else ''} {ranks} stopped answering"
            else:
                who = "every rank is still running, so they wait in different collectives"
        first = (str(err).strip().splitlines() or [""])[0][:160]
        return RanksStopped(
            f"rank {self.rank} at step {step + 1}: {who} (a collective failed after at most the "
            f"{timeout:g} s of --dist-timeout: {first}); find out why on that rank, then restart every "
            "rank with --resume"
        )
