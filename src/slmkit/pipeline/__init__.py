"""`slm pipeline`: base -> prune/distill -> fine-tune -> quantize -> evaluate -> export -> serve from
one YAML recipe (configs/pipeline/), resumable, with a report page comparing every stage.

recipe.py reads the recipe, config.py is its schema (each section a command's own config),
stages.py joins the stages, state.py fingerprints them, plan.py checks and estimates them
(--dry-run), measure.py is the evaluate stage, deploy.py the export stage, report.py and card.py
the report page and the model card, run.py the driver."""
