"""Evaluation of generators: FID-MNIST and Inception FID, KID, precision/recall, adherence, IS and CLIP score.

``evaluate_setting`` (one sampling setting), ``sweep`` (many) and ``evaluate_folder`` (images on disk) generate or
read images, measure them (``Scorers``) and score them against a reference (``load_reference``) beside the
real-vs-real floor (``real_vs_real_floor``); ``unnoise.eval.report`` writes JSON, markdown and plots, and
``unnoise.eval.cli`` is ``unnoise eval``.
"""

from unnoise.eval.adherence import Adherence, digit_adherence, images_to_tensor
from unnoise.eval.evaluate import Context, Setting, evaluate_folder, evaluate_setting, header, resolve_setting, sweep
from unnoise.eval.features import MNISTFeatures, load_extractor
from unnoise.eval.measure import METRICS, Measurements, Scorers, measure, score
from unnoise.eval.reference import Floor, RealSet, load_reference, real_vs_real_floor
from unnoise.eval.samples import SamplePlan, digit_plan, prompt_plan

__all__ = [
    "METRICS",
    "Adherence",
    "Context",
    "Floor",
    "MNISTFeatures",
    "Measurements",
    "RealSet",
    "SamplePlan",
    "Scorers",
    "Setting",
    "digit_adherence",
    "digit_plan",
    "evaluate_folder",
    "evaluate_setting",
    "header",
    "images_to_tensor",
    "load_extractor",
    "load_reference",
    "measure",
    "prompt_plan",
    "real_vs_real_floor",
    "resolve_setting",
    "score",
    "sweep",
]
