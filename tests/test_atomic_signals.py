"""Ctrl-C / SIGTERM landing just as an atomic write creates its temporary: nothing is orphaned.

Python raises KeyboardInterrupt at the next bytecode after the signal, which can be between the creation of the
temporary folder or file and the statement that records it for cleanup (an export stopped right after its "load
checkpoint" step left a ``.bundle.tmp-*`` folder this way). Here the signal is sent from inside the creation call
itself, the worst moment; the stop must still reach the caller."""

from __future__ import annotations

import os
import signal
import tempfile

import pytest

from facellm_edge.io import atomic_directory, atomic_file


def _signal_while(real, sig: int):
    """``real`` (tempfile.mkdtemp / mkstemp) that, once it has created its temporary, gets ``sig`` sent to this
    process: the handler runs at the next bytecode, before the temporary's name is back with the caller."""
    def made(*args, **kwargs):
        out = real(*args, **kwargs)
        os.kill(os.getpid(), sig)
        return out
    return made


@pytest.fixture
def sigterm_raises():
    """SIGTERM handled as the CLI handles it (an exception in the main thread), restored afterwards."""
    def stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    before = signal.signal(signal.SIGTERM, stop)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_as_the_temporary_folder_is_made_leaves_nothing(tmp_path, monkeypatch, sigterm_raises, sig):
    monkeypatch.setattr(tempfile, "mkdtemp", _signal_while(tempfile.mkdtemp, sig))
    ran = []
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(tmp_path / "bundle"):
            ran.append(True)
    assert not ran  # the stop came before the block: nothing of it ran
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_as_the_temporary_file_is_made_leaves_nothing(tmp_path, monkeypatch, sigterm_raises, sig):
    monkeypatch.setattr(tempfile, "mkstemp", _signal_while(tempfile.mkstemp, sig))
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(tmp_path / "answers.jsonl") as tmp:
            tmp.write_text("never")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_as_a_system_temporary_folder_is_made_leaves_nothing(tmp_path, monkeypatch, sigterm_raises, sig):
    """``temporary_directory`` (the export's tokenizer copy, the bench's hand-over folders) in the system temp dir."""
    from facellm_edge.io import temporary_directory

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(tempfile, "mkdtemp", _signal_while(tempfile.mkdtemp, sig))
    with pytest.raises(KeyboardInterrupt):
        with temporary_directory(prefix="facellm-tok-"):
            pass
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    with temporary_directory(prefix="facellm-tok-") as tmp:  # without a stop: an ordinary temporary folder
        assert os.path.isdir(tmp)
    assert not os.path.exists(tmp)
