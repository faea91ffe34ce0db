"""The paper's experiments at CPU scale: run specs, runners with a result cache, tables and plots.

``corrtools experiment NAME`` is the command; :func:`run_experiment` the function behind it.
``reset_z``: validation loss against RESET's interval z, fixed and automatic (Figure 2, right).
"""
from corrtools.experiments.paper import EXPERIMENTS, Experiment
from corrtools.experiments.runner import ExperimentResult, load_results, run_experiment, summarize
from corrtools.experiments.runs import RunSpec, train

__all__ = ["EXPERIMENTS", "Experiment", "ExperimentResult", "RunSpec", "load_results", "run_experiment",
           "summarize", "train"]
