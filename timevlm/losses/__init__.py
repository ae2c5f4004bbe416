"""Training losses beyond the forecast's MSE: the Time-VLM authors' loss design for aligning the modalities.

- `forecast`: the forecast of the masked future (their masked visual modelling, MVM) as MSE, or MSE + MAE;
- `itm`: image-text matching, a classifier that tells a window's own (vision, text) pair from a mismatched one;
- `wpa`: word-patch alignment, the optimal-transport (IPOT) distance between text tokens and visual patches;
- `alignment`: the weighted sum that a training step adds, from the train config's weights.

Every option is off by default; off, a training step is the same computation as without this package.
"""
