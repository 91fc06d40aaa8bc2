"""Two-stage decode-latency predictor (not built yet): stage 1 predicts a decode iteration's solo
latency from its batch, stage 2 corrects it per finetune quota level; online correction from live
telemetry. Pure logic: imports no torch and no ZMQ."""
