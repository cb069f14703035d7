"""An embedded text-conditional shapes-world model: captions from factors, a tiny CLIP text encoder and a pixel UNet2DConditionModel (see train.py)."""
