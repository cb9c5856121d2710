"""``python -m bench``: the whole suite in one invocation (see ``bench/README.md``)."""

from bench.suite import main

main()
