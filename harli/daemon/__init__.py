"""The supervising daemon: owns every public endpoint, spawns and supervises the children
(decode_proc now; finetune_proc later), routes inference requests, and stops cleanly."""
