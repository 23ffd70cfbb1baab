"""Shared pytest set-up: the repository root on sys.path so tests import model, rollout, ppo, ... directly."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
