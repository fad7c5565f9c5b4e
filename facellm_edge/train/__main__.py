"""``torchrun -m facellm_edge.train --base ... --data ...`` / ``accelerate launch -m facellm_edge.train ...``.

Same options and same code as ``facellm-edge train``: this forwards to the CLI's ``train`` command, so each
launched process parses the options, validates and runs ``facellm_edge.train.train``. The CLI's root flags
(``-v/--verbose``, ``--debug``) may be given anywhere and are moved before the command.
"""

import sys

from facellm_edge.cli import main

ROOT_FLAGS = ("-v", "--verbose", "--debug")


def run(argv: list[str]) -> int:
    root = [a for a in argv if a in ROOT_FLAGS]
    return main([*root, "train", *(a for a in argv if a not in ROOT_FLAGS)])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
