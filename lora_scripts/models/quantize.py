"""Quantised frozen base weights (``base_quantization``): the one place that knows how each kind is stored.

- ``int8`` / ``fp8``: weight-only, one scale per output channel, through torchao (``Int8WeightOnlyConfig``,
  ``Float8WeightOnlyConfig``; the matmul runs in the activations' precision on the de-quantised weight). Works on
  CPU and GPU. peft 0.21 wraps torchao-quantised linears as LoRA bases (``TorchaoLoraLinear``); optimum-quanto
  layers it does not know, which is why torchao is the library here.
- ``nf4``: QLoRA's 4-bit NormalFloat with double quantisation, through bitsandbytes (``Linear4bit``, peft's
  ``bnb.Linear4bit`` LoRA layer). CUDA only: refused in one line before anything loads.

Which modules are quantised is the caller's choice (the image task: the denoiser and the T5 / Qwen text encoders;
the text task: the LM without its output head); inside them every ``nn.Linear`` is. Convolutions, embeddings and
norms keep their precision. The LoRA weights are never quantised: peft adds them after this, in full precision.
Quantisation is deterministic (round to nearest), so a resumed run rebuilds bit for bit the base it trained on.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import torch

from ..errors import ConfigError

QUANTIZED_KINDS = ("fp8", "int8", "nf4")
TORCHAO_KINDS = ("fp8", "int8")


def _spelling(cfg: Any) -> str:
    """The key the user wrote (``quantization: 4bit`` is the older spelling of ``base_quantization: nf4``)."""
    return "quantization: 4bit" if getattr(cfg, "quantization", None) == "4bit" else \
        f"base_quantization: {cfg.base_quantization}"


def check_base_quantization(cfg: Any) -> None:
    """Refuse, in one line and before any weights load, a ``base_quantization`` this machine cannot run."""
    kind = cfg.base_quantization
    if kind == "none":
        return
    if getattr(cfg, "fsdp", False):
        # tried: fully_shard fails on torchao 0.18's Int8Tensor (no aten.split) and Float8Tensor (no aten.new_zeros)
        reason = ("FSDP2 cannot shard torchao's weight-only tensors: they lack the ops it needs"
                  if kind in TORCHAO_KINDS else "4-bit weights are not sharded here")
        raise ConfigError(f"{_spelling(cfg)} with fsdp is not supported ({reason}); use blocks_to_swap on one GPU "
                          "with int8 / fp8, or base_quantization: none")
    if kind == "nf4" and getattr(cfg, "blocks_to_swap", None):
        raise ConfigError(f"{_spelling(cfg)} with blocks_to_swap is not supported (block swap does not move "
                          "bitsandbytes' 4-bit quantisation state); use base_quantization: int8 or fp8 to swap blocks")
    if kind == "nf4":
        if not torch.cuda.is_available():
            raise ConfigError(f"{_spelling(cfg)} (QLoRA) needs a CUDA GPU (bitsandbytes); use base_quantization: "
                              "int8 or fp8 on this machine, or none")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(f"{_spelling(cfg)} needs bitsandbytes (pip install 'lora-scripts[bnb]')") from None
        return
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        raise ConfigError(f"base_quantization: {kind} needs torchao (pip install 'lora-scripts[quant]'), or set "
                          "base_quantization: none") from None


def _torchao_config(kind: str) -> Any:
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    # set_inductor_config=False: torchao would otherwise change torch.compile's global settings; nothing compiles here
    if kind == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    return Float8WeightOnlyConfig(set_inductor_config=False)


def quantize_frozen(module: torch.nn.Module, kind: str, device: torch.device, compute_dtype: torch.dtype,
                    skip: tuple[str, ...] = ()) -> torch.nn.Module:
    """Store every ``nn.Linear`` of ``module`` (but those named in ``skip``) as ``kind`` and move ``module`` to
    ``device``, in place. Call it on the frozen module before LoRA is attached, with its weights on the CPU in the
    precision they should compute in (``compute_dtype``): each layer goes to ``device`` and is quantised there in
    turn, so a model that only fits quantised never sits whole on the GPU in full precision."""
    if kind == "none":
        return module.to(device)
    module.requires_grad_(False)

    def wanted(layer: torch.nn.Module, name: str) -> bool:
        return isinstance(layer, torch.nn.Linear) and name not in skip

    if kind in TORCHAO_KINDS:
        from torchao.quantization import quantize_

        quantize_(module, _torchao_config(kind), filter_fn=wanted, device=device)
        # peft warns that a TorchaoLoraLinear without torchao's re-quantisation hook cannot merge in place; nothing
        # here merges into a quantised base (the text export merges into the full-precision one), so say it once
        # in the docs instead of once per layer
        warnings.filterwarnings("ignore", message=r"TorchaoLoraLinear was instantiated without")
    elif kind == "nf4":
        _swap_to_nf4(module, wanted, compute_dtype)
        module.is_loaded_in_4bit = True  # what peft reads to wrap bnb.nn.Linear4bit layers with its 4-bit LoRA
    else:
        raise ValueError(f"unknown base_quantization {kind!r}")
    return module.to(device)


def _swap_to_nf4(module: torch.nn.Module, wanted: Any, compute_dtype: torch.dtype) -> None:
    """Replace the wanted linears by bitsandbytes ``Linear4bit`` (NF4, double quantisation); the weights are
    quantised when the module moves to the GPU. Written here because diffusers and transformers only offer this
    while loading ``from_pretrained`` (their ``BitsAndBytesConfig``), and the image families load single files and
    separately given components too."""
    import bitsandbytes as bnb

    compute = torch.bfloat16 if compute_dtype == torch.float32 else compute_dtype
    for name, layer in list(module.named_modules()):
        if not wanted(layer, name) or not name:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                compute_dtype=compute, compress_statistics=True, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(layer.weight.data.to(compute), requires_grad=False,
                                       compress_statistics=True, quant_type="nf4")
        if layer.bias is not None:
            new.bias = torch.nn.Parameter(layer.bias.data.to(compute), requires_grad=False)
        setattr(parent, child, new)


def is_quantized_weight(weight: torch.Tensor) -> bool:
    """Whether a linear's weight is stored by one of the quantisation libraries (torchao tensor or bnb Params4bit)."""
    kind = type(weight)
    return any(base.__module__.split(".")[0] in ("torchao", "bitsandbytes") for base in kind.__mro__[:-1])


def storage_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold ``tensor``'s data: itself, or a torchao tensor's inner ``qdata`` / ``scale``…
    (its ``__tensor_flatten__``), so hashing and byte counts see what is stored."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, torch.nn.Parameter):
        yield tensor
        return
    names, _ = tensor.__tensor_flatten__()
    for name in names:
        inner = getattr(tensor, name)
        if inner is not None:
            yield from storage_tensors(inner)


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes the parameters and buffers of ``module`` occupy as stored (quantised ones at their packed size)."""
    return sum(inner.numel() * inner.element_size()  # parameters() already lists a tied weight once
               for tensor in [*module.parameters(), *module.buffers()] for inner in storage_tensors(tensor.data))


def skip_quantized_in_ddp(module: torch.nn.Module) -> None:
    """Tell DDP not to broadcast the quantised weights of ``module`` (the module it will wrap) at start-up: its
    broadcast flattens every parameter, which torchao's tensors do not support, and every process quantised the same
    weights the same way already. Only trainable parameters are synchronised after that, as before."""
    names = [name for name, param in module.named_parameters() if is_quantized_weight(param)]
    if names:
        ignored = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
        module._ddp_params_and_buffers_to_ignore = ignored + names  # torch DDP's own hook for this
