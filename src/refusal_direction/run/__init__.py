"""Run stage: the run directory (`rundir`) and the pipeline that fills it, one module per group of stages."""
