"""Weight-sharing supernet evaluator (Once-for-All / single-path one-shot): docs/supernet.md."""

from nas.supernet.checkpoint import SupernetMeta, load_supernet
from nas.supernet.evaluate import SupernetEvaluator, SupernetHealth, supernet_health
from nas.supernet.extract import extract
from nas.supernet.model import SubnetPlan, Supernet, check_supported
from nas.supernet.train import SupernetRecipe, train_supernet

__all__ = ["Supernet", "SubnetPlan", "SupernetEvaluator", "SupernetHealth", "SupernetMeta", "SupernetRecipe",
           "check_supported", "extract", "load_supernet", "supernet_health", "train_supernet"]
