"""Offline Kaggle bundle (issue #4): placeholder until implemented."""

from __future__ import annotations

import argparse

from kaggle_tta.errors import KaggleTTAError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline")
    p.add_argument("--out", default="build/kaggle")


def run(args: argparse.Namespace) -> None:
    raise KaggleTTAError("kernel: not implemented yet")
