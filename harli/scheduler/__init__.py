"""SLO-aware scheduling, pure logic for the daemon: before each decode iteration, the finetune's
quota level that keeps decode's TPOT inside its SLO (``policy``: ``HarliPolicy.decide(view,
now) -> PolicyDecision`` and the baselines), the error budget that sets the quantile its bound
stands for (``budget``), the finetune's measured rate per level (``rates``), SLO attainment
counting (``slo``) and how many free KV blocks decode can lend (``lending``). Imports no torch
and no ZMQ."""
