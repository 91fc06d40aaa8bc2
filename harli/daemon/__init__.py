"""The supervising daemon: owns every public endpoint, spawns and supervises decode_proc and
finetune_proc, routes inference requests to decode, runs finetune jobs under the quota it
schedules, lends the memory pool between the two, and stops cleanly. Entry: ``server.py``
(``run_daemon``); the loop: ``daemon.py`` (``Daemon``)."""
