"""`python -m mmformer`: the `mmformer` command (`python -m mmformer.cli` is the same; Lightning reruns whichever
module started a multi-process ``fit``)."""

from mmformer.cli.main import run

run()
