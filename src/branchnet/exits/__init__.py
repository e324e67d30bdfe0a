"""Early exits: heads at several taps of a frozen parent, the parent run stage by stage so that
inputs leave early, and exit thresholds calibrated so that the early answer keeps to the full
model's with a stated probability."""

from branchnet.exits.calibrate import ExitCalibration, ExitError, calibrate_exit_threshold, exit_at
from branchnet.exits.heads import ExitHead
from branchnet.exits.multiexit import ExitPrediction, MultiExit
from branchnet.exits.rules import RULES, exit_scores
from branchnet.exits.stages import StageError, Stages, split

__all__ = ["RULES", "ExitCalibration", "ExitError", "ExitHead", "ExitPrediction", "MultiExit",
           "StageError", "Stages", "calibrate_exit_threshold", "exit_at", "exit_scores", "split"]
