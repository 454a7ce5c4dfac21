"""Pruning criteria: one file per saliency method, one interface (:mod:`.base`)."""
from .base import (BATCHNORM, COMBINE, Criterion, Saliency, SaliencyInput, get_criterion,  # noqa: F401
                   list_criteria, register_criterion, saliency_model)
from . import bn_scale, fpgm, hrank, none, norm, obd, random, sosp_h, sosp_i, taylor  # noqa: F401,E402
