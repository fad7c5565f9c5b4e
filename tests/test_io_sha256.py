"""The one sha256 helper pair of ``facellm_edge.io``: bytes in memory and a file read in blocks agree."""

from __future__ import annotations

from facellm_edge.io import sha256_bytes, sha256_file


def test_sha256_of_bytes_and_of_a_file_agree(tmp_path):
    assert sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2
    data = bytes(range(256)) * 5000  # more than one block of sha256_file's reads (chunk below)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path, chunk=4096) == sha256_bytes(data) != sha256_bytes(data[:-1])


def test_an_interrupted_atomic_directory_outlasts_a_writer_thread(tmp_path):
    """Ctrl-C while a library's thread still writes files into the temporary folder (an interrupted ONNX save):
    the folder is gone afterwards, not left half-removed."""
    import threading
    import time

    import pytest

    from facellm_edge.io import atomic_directory

    dest = tmp_path / "bundle"
    stop_at = []

    def writer(folder):  # many small files into a subfolder, as an ONNX save writes external tensors
        end = time.monotonic() + 0.4
        i = 0
        while time.monotonic() < end:
            try:
                (folder / "vision").mkdir(exist_ok=True)
                (folder / "vision" / f"part-{i}.bin").write_bytes(b"x")
            except OSError:  # the folder is being removed under it
                pass
            i += 1
        stop_at.append(i)

    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(dest) as tmp:
            t = threading.Thread(target=writer, args=(tmp,), daemon=True)
            t.start()
            time.sleep(0.1)  # a few thousand files by now
            raise KeyboardInterrupt
    t.join(5)
    assert stop_at and not dest.exists() and list(tmp_path.iterdir()) == []
