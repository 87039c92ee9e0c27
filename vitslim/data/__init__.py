"""Input pipelines: image folders with the DeiT augmentation or the embedded digits (loaders), the per-image
recipe pieces (images), decoding and augmenting on the GPU (device: --loader gpu / dali), and the batched tensor
ops that augmentation runs (augment)."""
