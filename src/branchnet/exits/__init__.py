"""Early exits: thresholds calibrated so that the early answer keeps to the full model's with a
stated probability (the rest of early exits, issue 11, builds on this)."""

from branchnet.exits.calibrate import ExitCalibration, ExitError, calibrate_exit_threshold, exit_at

__all__ = ["ExitCalibration", "ExitError", "calibrate_exit_threshold", "exit_at"]
