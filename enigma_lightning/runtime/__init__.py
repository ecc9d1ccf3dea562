"""Run infrastructure: validation, callbacks, checkpoints, loggers, sweeps, the command-line helpers, the CPU
allocator setting and the OmegaConf resolvers."""
