"""The peers of `python -m bench peers`: KVPR's published code and FlexGen, run beside KV Lab on the same GPU.

- `shapes`:   the OPT models and run shapes each peer's README and scripts use, and the bytes each peer's
              schedule moves over PCIe per decode step (read from its code, computed, not counted).
- `workdir`:  the working folder a peer runs in (OPT config and tokenizer files, offload folders): no network.
- `commands`: each peer's command line and its own environment (a --target install, its own PYTHONPATH).
- `parse`:    the peers' printed benchmark logs -> figures.
- `runner`:   one peer run in its own subprocess with a timeout; a failure is recorded, never raised.
- `kvlab`:    KV Lab on the same model and shape: all K/V on the CPU (split auto, split 0) and a hybrid.

None of the peers' code is part of KV Lab: it is brought to the GPU machine beside the checkout (.peers/, git-ignored)
and run from there.
"""
