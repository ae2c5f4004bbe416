"""Text-augmented learner: one descriptive prompt per window.

The per-window statistics come first and the dataset description last, and the tokenizer truncates by
tokens (`max_prompt_tokens`), so the statistics always reach the model. Statistics are pooled across
variables: they describe the cross-variable mean series of the (train-scaled) window.
"""
from __future__ import annotations

import torch


def window_statistics(x: torch.Tensor, n_lags: int = 3) -> dict[str, torch.Tensor]:
    """[B, L, N] -> per-window min, max, median, last, slope and top autocorrelation lags of the mean series."""
    s = x.float().mean(-1)  # [B, L]
    b, l = s.shape
    t = torch.arange(l, dtype=s.dtype, device=s.device)
    tc = t - t.mean()
    slope = ((s - s.mean(1, keepdim=True)) * tc).sum(1) / (tc ** 2).sum()
    centred = s - s.mean(1, keepdim=True)
    spec = torch.fft.rfft(centred, n=2 * l, dim=1)
    acf = torch.fft.irfft(spec * spec.conj(), dim=1)[:, 1:l // 2 + 1]  # lags 1..L/2
    lags = acf.topk(min(n_lags, acf.shape[1]), dim=1).indices + 1
    return {"min": s.min(1).values, "max": s.max(1).values, "median": s.median(1).values,
            "last": s[:, -1], "slope": slope, "lags": lags}


def build_prompts(x: torch.Tensor, *, seq_len: int, pred_len: int, description: str, freq: str = "") -> list[str]:
    """One prompt per window: its statistics, the task, then the dataset's description if one is given (cut
    first by the tokenizer's limit). Every word carries something: the fitted change over the window (slope x
    length, in the window's units) replaces a trend word plus a per-step slope that needed 4 decimals and
    rounded to +0.0000 on most windows; labels are single words, no filler."""
    st = {k: v.cpu() for k, v in window_statistics(x).items()}
    span = x.shape[1] - 1
    task = f"forecast {pred_len} steps{f' ({freq})' if freq else ''} from {seq_len}."
    prompts = []
    for i in range(x.shape[0]):
        lags = " ".join(str(int(v)) for v in st["lags"][i])
        prompts.append(
            f"min {float(st['min'][i]):.2f} max {float(st['max'][i]):.2f} median {float(st['median'][i]):.2f} "
            f"last {float(st['last'][i]):.2f} change {float(st['slope'][i]) * span:+.2f} lags {lags}; {task}"
            + (f" {description}" if description else ""))
    return prompts
