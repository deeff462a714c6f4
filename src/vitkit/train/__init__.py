"""Training and evaluation: `vitkit train` (recipes, the loop, checkpoints, resumption, DDP/FSDP) and
`vitkit eval`."""
