"""Weight-sharing supernet evaluator (Once-for-All / single-path one-shot): docs/supernet.md."""

from nas.supernet.extract import extract
from nas.supernet.model import Supernet, SubnetPlan, check_supported

__all__ = ["Supernet", "SubnetPlan", "check_supported", "extract"]
