"""Files on disk, one helper of each kind: every byte the toolkit reads from a user's image or writes under a
user's name goes through this package, so that each rule (ownership, umask, temp names, stale-temp removal,
decoded-size bound) exists once.

* :mod:`~facellm_edge.io.ownership` — what ``--force`` may replace (our marker file, recognisers).
* :mod:`~facellm_edge.io.files` — sha256 (of bytes, of a file), the JSON object reader, the user cache folder, permissions, stale
  temporaries, atomic folder and file writes.
* :mod:`~facellm_edge.io.outputs` — single output files streamed into (``--jsonl``, ``--output``).
* :mod:`~facellm_edge.io.images` — the bounded image reader.

Import the names from here (``from facellm_edge.io import atomic_file``): the split into modules is for reading.
"""

from facellm_edge.io.files import (
    apply_default_modes, atomic_directory, atomic_file, atomic_write_text, clean_stale_temp_files, clean_stale_temps,
    commit_temp_file, current_umask, dir_mode, file_mode, loads_json, read_json_object, replace_directory,
    sha256_bytes, sha256_file, temp_file_beside, temporary_directory, user_cache_dir,
)
from facellm_edge.io.images import (
    DEFAULT_MAX_PIXELS, check_image_header, decode_image, image_size, read_image, read_image_rgb,
)
from facellm_edge.io.outputs import check_output_file, open_line_log, write_line
from facellm_edge.io.ownership import (
    MARKER, OUTPUT, TOOL, OutputKind, Recogniser, check_replaceable, check_replaceable_file, files_under,
    known_file_set, marker_files, output_path,
)

__all__ = [
    "DEFAULT_MAX_PIXELS", "MARKER", "OUTPUT", "OutputKind", "Recogniser", "TOOL", "apply_default_modes",
    "atomic_directory", "atomic_file", "atomic_write_text", "check_image_header", "check_output_file",
    "check_replaceable", "check_replaceable_file", "clean_stale_temp_files", "clean_stale_temps", "commit_temp_file",
    "current_umask", "decode_image", "dir_mode", "file_mode", "files_under", "image_size", "known_file_set",
    "loads_json", "marker_files", "open_line_log", "output_path", "read_image", "read_image_rgb", "read_json_object",
    "replace_directory", "sha256_bytes", "sha256_file", "temp_file_beside", "temporary_directory", "user_cache_dir",
    "write_line",
]
