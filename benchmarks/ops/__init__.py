"""One module per benchmarked op; each defines ``add_arguments(parser)`` and ``run(args)``."""
