"""The embedded demo: synthetic scenes, small members and their training scripts."""

DEMO_SIZE = 72  # side of a demo image in pixels: what `make infer` writes and the members were trained on
