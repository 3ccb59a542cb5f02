"""The commands as library calls: one typed config per verb (`QuantizeJob`, `EvalJob`, ...) and the
function that runs it. `slm <verb>` builds its flags from these dataclasses, and a `slm pipeline`
stage is exactly one of them, so a step has one implementation whoever calls it."""
