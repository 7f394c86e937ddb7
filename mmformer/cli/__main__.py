"""`python -m mmformer.cli`, and every rank Lightning starts for a multi-process ``fit`` (it reruns this module)."""

from mmformer.cli.main import run

run()
