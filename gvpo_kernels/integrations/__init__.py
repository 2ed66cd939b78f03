"""Plug-ins that put the GVPO loss into other trainers; each module imports its trainer only when imported itself.

    from gvpo_kernels.integrations.trl import GVPOConfig, GVPOTrainer   # TRL: subclass of GRPOTrainer (extra "trl")
    import gvpo_kernels.integrations.verl                               # verl: registers loss_mode "gvpo" ("verl")

See README.md in this folder for both, runnable as written.
"""
