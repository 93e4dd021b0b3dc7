#!/usr/bin/env python3
"""BIDS-App entry point: ``run.py bids_dir output_dir {template,participant,group}``.

Thin on purpose: everything lives in :mod:`mmfusion.cli`.
"""
import sys

from mmfusion.cli import main

if __name__ == "__main__":
    sys.exit(main())
