"""
Data preparation for CAPNet: raw VOC / COCO / NUS-WIDE releases and list files to the
prepared format `data/<name>/dataset.json` (SPEC section 5), and the embedded synthetic
long-tailed world with its small pretrained CLIP.

    python data_prep.py synthetic-lt
    python data_prep.py voc-lt --voc-root DIR --split img_id.txt
    python data_prep.py coco-lt --coco-root DIR --split img_id.pkl
    python data_prep.py nus-wide-lt --nus-root DIR
    python data_prep.py lists --train F --test F --classes F --image-root DIR --name NAME
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

# -----------------------------------------------------------------------------
# common: writing dataset.json, class statistics

# -----------------------------------------------------------------------------
# VOC-LT, COCO-LT, NUS-WIDE-LT, lists

# -----------------------------------------------------------------------------
# long-tail split sampling (Wu et al. 2020)

# -----------------------------------------------------------------------------
# synthetic-lt: procedurally drawn scenes and a small contrastively pretrained CLIP

# -----------------------------------------------------------------------------
# CLI

if __name__ == "__main__":
    main()
