"""From prompts to a trained, calibrated drafter: training and evaluation prompt sets, target-made
data, cached features, training, calibration runs. Imports core, model, drafters and decode."""
