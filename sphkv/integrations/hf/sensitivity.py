"""How much each attention head's output error costs the model's loss.

Perturbing head h's attention output (the input of ``o_proj``) at a position by ``δ`` changes
the expected loss by ``½ δᵀ F δ`` to second order, ``F`` the Fisher of the next-token
distributions with respect to that output. Approximating ``F`` by its trace spread evenly,
``F ≈ (tr F / d) I``, makes the change ``(tr F / 2d) ‖δ‖²``: one weight per head,

    s_h = E_t ‖∂ℓ/∂o_{h,t}‖²,   ℓ = Σ_t −log p(y_t | x_{≤t}),   y_t ~ p(· | x_{≤t}),

the labels drawn from the model itself (the Fisher, not the empirical Fisher of the text's
tokens). One backward pass gives every layer's heads; they are calibrated once per model, on
the text shipped with the package (:func:`calibration_ids`), not on each prompt.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch

from sphkv.integrations.hf.text import read_tokens

__all__ = ["calibration_ids", "head_sensitivity", "head_weights_for"]


def calibration_ids(tokenizer, tokens: int = 1024) -> torch.Tensor:
    """The first ``tokens`` token ids of the text shipped with the package (the opening of
    Pride and Prejudice, the project's tuning text)."""
    path = resources.files("sphkv") / "data" / "pride_and_prejudice_opening.txt"
    with resources.as_file(path) as file:
        return read_tokens(tokenizer, file, tokens)


def _output_projections(model) -> list[torch.nn.Module]:
    """Each decoder layer's attention output projection, in layer order."""
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    found = [m.o_proj for name, m in model.named_modules()
             if name.endswith("self_attn") and hasattr(m, "o_proj")]
    if len(found) != layers:
        raise ValueError(f"found {len(found)} attention output projections (self_attn.o_proj) "
                         f"in a model of {layers} layers")
    return found


def head_sensitivity(model, ids: torch.Tensor, scored: int | None = None,
                     seed: int = 0) -> np.ndarray:
    """``s`` float64 ``[layers, query heads]`` (module docstring), averaged over the last
    ``scored`` positions of ``ids`` (half of them by default).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        Its layers' attention must be named ``self_attn`` with an ``o_proj`` (Llama, Mistral,
        Qwen, Gemma and most decoders).
    ids : torch.Tensor
        int ``[T]``, ``T >= 2``: the calibration text (:func:`calibration_ids`).
    scored : int, optional
        Positions whose labels are drawn and whose gradients are averaged, in ``[1, T]``.
    seed : int
        Seed of the drawn labels.
    """
    ids = torch.as_tensor(ids).reshape(-1)
    if ids.numel() < 2:
        raise ValueError(f"ids must hold at least 2 tokens, got {ids.numel()}")
    scored = ids.numel() // 2 if scored is None else scored
    if not 1 <= scored <= ids.numel():
        raise ValueError(f"scored must be in [1, {ids.numel()}], got {scored}")
    text = model.config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    outputs: list[torch.Tensor] = []

    def keep(_module, args):
        args[0].retain_grad()
        outputs.append(args[0])

    hooks = [proj.register_forward_pre_hook(keep) for proj in _output_projections(model)]
    params = [(p, p.requires_grad) for p in model.parameters()]
    try:
        # gradients for the activations only: the graph starts at the embeddings
        for p, _ in params:
            p.requires_grad_(False)
        device = model.get_input_embeddings().weight.device
        embeds = model.get_input_embeddings()(ids[None].to(device)).detach().requires_grad_()
        with torch.enable_grad():
            logits = model(inputs_embeds=embeds, use_cache=False).logits[0, -scored:].float()
            generator = torch.Generator(device=logits.device).manual_seed(seed)
            with torch.no_grad():
                labels = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in params:
            p.requires_grad_(flag)
    return np.stack([
        out.grad[0, -scored:].reshape(scored, heads, -1).double().square().sum(-1).mean(0)
        .cpu().numpy() for out in outputs])


def head_weights_for(model, tokenizer, method: str) -> np.ndarray | None:
    """What a cache of ``method`` needs as ``head_weights``: the model's sensitivities on
    :func:`calibration_ids` for a ``sensitive`` method, None for the others."""
    from sphkv.rdr import get_method

    if method == "none" or not get_method(method).sensitive:
        return None
    return head_sensitivity(model, calibration_ids(tokenizer))
