"""The one sha256 helper pair of ``facellm_edge.io``: bytes in memory and a file read in blocks agree."""

from __future__ import annotations

from facellm_edge.io import sha256_bytes, sha256_file


def test_sha256_of_bytes_and_of_a_file_agree(tmp_path):
    assert sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2
    data = bytes(range(256)) * 5000  # more than one block of sha256_file's reads (chunk below)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path, chunk=4096) == sha256_bytes(data) != sha256_bytes(data[:-1])
