"""Conditional mixture-of-experts linears (SPEC §2, §13.1).

router.py scores, dispatch.py selects and groups, experts.py holds and applies expert weights
(fused_dispatch.py: the fused token-dispatch linear),
losses.py has the auxiliary losses, routed.py / segment_linear.py / token_linear.py the routed
linears and layer.py `build_routed_linears`,
telemetry.py the aux record, fold.py dense folding, parallel.py expert parallelism, reference.py
loop oracles, keys.py reference checkpoint keys. Importing this package imports torch.
"""

from uniperceiver_cli.model.moe.fold import FoldError, FoldReport, fold, fold_report
from uniperceiver_cli.model.moe.layer import (
    MoEConfigError,
    SegmentRoutedLinear,
    SharedDecisionError,
    TokenRoutedLinear,
    build_routed_linears,
    validate_moe_config,
)
from uniperceiver_cli.model.moe.router import RoutingError, UnseenTaskError
from uniperceiver_cli.model.moe.telemetry import MoEAux, SegmentRoute, total_aux_loss

__all__ = [
    "FoldError",
    "FoldReport",
    "MoEAux",
    "MoEConfigError",
    "RoutingError",
    "SegmentRoute",
    "SegmentRoutedLinear",
    "SharedDecisionError",
    "TokenRoutedLinear",
    "UnseenTaskError",
    "build_routed_linears",
    "fold",
    "fold_report",
    "total_aux_loss",
    "validate_moe_config",
]
