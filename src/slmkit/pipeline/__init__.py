"""`slm pipeline`: base -> prune/distill -> fine-tune -> quantize -> evaluate -> export -> serve from
one YAML recipe (configs/pipeline/), resumable, with a report page comparing every stage.

recipe.py reads the recipe, config.py is its schema (each section a command's own config),
stages.py has one class per stage kind (resolve, check and estimate, run, outputs) in the one
registry plan.py (--dry-run) and run.py (the driver) loop over, state.py fingerprints them,
estimate.py holds the dry run's cost constants, measure.py and deploy.py do the evaluate and
export stages' work, report.py and card.py write the report page and the model card, verb.py is
`slm pipeline` and `slm demo`."""
