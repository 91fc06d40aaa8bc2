"""SLO-aware scheduling policies (not built yet): before each decode iteration pick the finetune
quota level and memory lending that keep decode TPOT inside its SLO. Pure logic: imports no
torch and no ZMQ; ``decide(state, now) -> Decision``."""
