"""Sensors: wait for training jobs and rollouts."""
