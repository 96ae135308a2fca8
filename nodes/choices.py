"""Inputs the Train nodes share, defined once: the optimizer and the learning rate that goes with it, and the
adapter algorithm of the nodes that train one."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..trainers.config import ALGORITHMS, OPTIMIZERS

DEFAULT_OPTIMIZER = "auto"
"""What a graph saved before the `optimizer` input existed trains with (the input is optional for that reason)."""
OPTIMIZER_TIPS = {
    "auto": "AdamW, or 8-bit AdamW where the memory plan needs it to fit the GPU (bitsandbytes installed)",
    "adamw": "AdamW, the usual choice",
    "adamw8bit": "AdamW with 8-bit state (bitsandbytes, NVIDIA GPUs): less memory",
    "prodigy": "Prodigy finds its own step size: leave learning_rate at 0",
    "schedulefree_adamw": "schedule-free AdamW: no schedule to tune; samples and the result use its averaged weights",
    "adafactor": "Adafactor: factored state, a full fine-tune in less memory",
}


def optimizer_input() -> io.Combo.Input:
    return io.Combo.Input("optimizer", options=list(OPTIMIZERS), default=DEFAULT_OPTIMIZER, optional=True,
                          tooltip="How the weights are updated. " + "; ".join(f"{name}: {tip}" for name, tip
                                                                              in OPTIMIZER_TIPS.items()) + ".")


def learning_rate_input(method_default: str) -> io.Float.Input:
    return io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=0.0000001,
                          tooltip=f"0 = the optimizer's default: 1.0 for prodigy, 1e-2 for adafactor, else the "
                                  f"method's ({method_default}). A value set here always wins.")


DEFAULT_ALGORITHM = "lora"
"""What a graph saved before the `algorithm` input existed trains (the input is optional for that reason)."""


def algorithm_input() -> io.Combo.Input:
    return io.Combo.Input("algorithm", options=list(ALGORITHMS), default=DEFAULT_ALGORITHM, optional=True,
                          tooltip="The adapter: lora (LoCon with [lora] targets = \"all\"); loha (LyCORIS Hadamard "
                                  "product: more detail at the same size); lokr (LyCORIS Kronecker product: very "
                                  "small files; [lora] lokr_factor in `advanced`); dora (LoRA that also trains each "
                                  "output row's magnitude: closer to a full fine-tune; loads exactly in ComfyUI and "
                                  "Forge, not in AUTOMATIC1111). All load in ComfyUI's Load LoRA.")
