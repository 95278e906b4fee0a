"""`longext doctor`: does longext work on this machine, how fast, and does `longext plan` tell the truth here?

One command runs a fixed list of checks (versions, device, bf16, attention kernels, the GPU test tier, a tiny
train -> eval -> export round trip through the CLI, measured LoRA steps against `longext plan`, ...), prints a
table and writes DIR/doctor.json. Layout of the package:

  run.py       the list of checks and their sizes on GPU and on CPU; `run_doctor`
  report.py    Check records, doctor.json / doctor.md / doctor.log, the rich table
  probes.py    in-process checks of the environment (versions, device, bf16, attention, matmul peak, fused Adam)
  commands.py  `longext ...` (and pytest) in subprocesses, logged; `longext plan --json`
  material.py  generated inputs: synthetic text, a tokenizer, a tiny model, random SmolLM2-shaped weights, recipes
  cli_checks.py  the checks made through the CLI: the round trip, the eval forward, the GPU test tier
  steps.py     measured LoRA steps against `longext plan`, and the Ulysses SP=1 check
  longest.py   --longest: the plan's longest length for this GPU (time-capped), one step there
  step.py      the measuring process itself: the only doctor module that imports longext's training internals
"""
