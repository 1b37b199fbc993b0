"""Several `align` commands one after another in this process, as `align run` runs its stages:
`torchrun --nproc_per_node 2 tests/align_commands.py "run R" "ppo R"` trains what `torchrun ... -m align run R`
then `torchrun ... -m align ppo R` would, with one start-up (imports, process group) for all of them. Stops at
the first command that fails, with its exit status."""

import shlex
import sys

from align.cli import main

for command in sys.argv[1:]:
    if status := main(shlex.split(command)):
        sys.exit(status)
