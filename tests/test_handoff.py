"""The executor/driver handshake: sequence numbers prevent re-reading an old pause."""

from __future__ import annotations

import threading

from djinn_kernel.handoff import Command, Event, Handoff


def test_pause_round_trip_and_sequence():
    h = Handoff()
    answers = []

    def worker():
        answers.append(h.pause("first"))
        answers.append(h.pause("second"))
        h.post(Event.FINISHED)

    seen = h.seq
    t = threading.Thread(target=worker)
    t.start()
    got = h.wait(seen)
    assert (got.event, got.payload) == (Event.PAUSED, "first")
    h.send(Command.STEP)
    got2 = h.wait(got.seq)
    assert got2.seq == got.seq + 1 and got2.payload == "second", "never the previous pause again"
    h.send(Command.CONTINUE)
    done = h.wait(got2.seq)
    t.join()
    assert done.event is Event.FINISHED and answers == [Command.STEP, Command.CONTINUE]


def test_wait_times_out_without_event():
    h = Handoff()
    assert h.wait(h.seq, timeout=0.01) is None
