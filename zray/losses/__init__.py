"""Pure loss functions (torch only): GDSO, GRPO, RISD, OPD, Turbo++, reward gradient.

Each loss takes tensors and returns `(loss, metrics)`, with shapes in its docstring and the equation of
../shared/spec/methods.md it implements. The modules land with the issues that train with them.
"""
