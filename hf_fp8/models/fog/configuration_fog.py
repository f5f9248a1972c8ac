"""FOG ("fast and outlier-guarded") model configuration.

FOG is the transformer block of "Towards Fully FP8 GEMM LLM Training at Scale" (Hernandez-Cano,
Garbaya, Schlag, Jaggi; NeurIPS 2025, arXiv 2505.20524): a Llama-like decoder changed so that its
activations have no large outliers, which lets every GEMM of the block, attention's QK^T and P.V
included, run in FP8 with per-tensor delayed scaling.

This file imports only transformers (and the standard library), never hf_fp8: `save_pretrained`
copies it next to the weights, so a stock transformers can load the checkpoint with
`trust_remote_code=True`.
"""

import math

from transformers import PretrainedConfig

# variant -> (attention entropy guard on Q and K, MLP activation). See FOGConfig's docstring.
FOG_VARIANTS = {
    "fog-max": ("rmsnorm", "xielu"),
    "fog-opt": ("rmsnorm", "gelu"),
    "fog-flash": ("tanh", "gelu"),
}


def default_softmax_scale(head_dim: int) -> float:
    """sqrt(2 / head_dim): sqrt(2) times the usual 1/sqrt(head_dim).

    Why raised at all: with the gain-free QK RMSNorm (or tanh) the attention logits are bounded
    (|q.k| <= head_dim), and the model can no longer sharpen attention by growing Q and K; the
    paper raises the softmax scale instead of learning QK gains (learned gains blew up in FP8).
    This rule gives the paper's 1.5B value, 0.125 at head_dim 128. The paper's 390M model also has
    head_dim 128 but uses 0.17678 (= 2/sqrt(128)), so no rule of head_dim alone gives both: the
    390M recipes in recipes/models set softmax_scale explicitly."""
    return math.sqrt(2.0 / head_dim)


class FOGConfig(PretrainedConfig):
    r"""Configuration of a FOG decoder (FOGModel / FOGForCausalLM). Defaults: the paper's 1.5B shape.

    The FOG block, relative to a Llama block (paper section 3; hf_fp8's fp8-background.md 1.1):
    1. no pre-normalization before attention or MLP, and no final norm before the LM head;
    2. an attention "entropy guard" on Q and K, per head: RMSNorm with frozen unit gains
       (fog-max, fog-opt) or elementwise tanh(alpha * x) with a learnable scalar alpha (fog-flash);
    3. a softmax scale raised above 1/sqrt(head_dim) (`softmax_scale`);
    4. input scaling: the embedding output is multiplied by `input_scale` = 1/init_std (x50);
    5. post-normalization of each branch before its residual add, x = x + RMSNorm(branch(x)),
       the RMSNorm gains starting at 1/sqrt(num_hidden_layers);
    6. a non-gated MLP (up -> activation -> down), no biases anywhere; activation xIELU (fog-max)
       or GeLU (fog-opt, fog-flash).

    Args:
        variant (`str`, defaults to "fog-max"):
            "fog-max" (frozen QK RMSNorm + xIELU), "fog-opt" (frozen QK RMSNorm + GeLU) or
            "fog-flash" (tanh on Q, K + GeLU; the fastest).
        vocab_size (`int`, defaults to 32768): vocabulary size.
        hidden_size (`int`, defaults to 2048): width of the residual stream.
        intermediate_size (`int`, *optional*):
            width of the non-gated MLP. Default `6 * hidden_size`: a gated (SwiGLU) MLP of width g
            has 3*hidden*g weights and a non-gated one of width f has 2*hidden*f, so the same
            parameter count needs f = 1.5*g; the default is 1.5x a gated MLP of width 4*hidden
            (the paper's 1.5B ratio, gated 8192 at hidden 2048 -> 12288 non-gated).
        num_hidden_layers (`int`, defaults to 16): number of decoder blocks.
        num_attention_heads (`int`, defaults to 16): query heads.
        num_key_value_heads (`int`, *optional*):
            key/value heads (grouped-query attention); must divide num_attention_heads.
            Default: num_attention_heads (multi-head attention).
        head_dim (`int`, *optional*): width of one head, even (RoPE). Default hidden_size // num_attention_heads.
        max_position_embeddings (`int`, defaults to 4096): longest sequence the model is meant for.
        rope_theta (`float`, defaults to 500000.0): RoPE base.
        softmax_scale (`float`, *optional*):
            multiplies q.k before the softmax (passed as `scaling` to the attention function).
            Default `sqrt(2 / head_dim)` (0.125 at head_dim 128, the paper's 1.5B value); see
            `default_softmax_scale`. The paper's 390M model used 0.17678.
        init_std (`float`, defaults to 0.02): std of the normal init of every linear and embedding weight.
        input_scale (`float`, *optional*): multiplies the embedding output. Default 1 / init_std.
        rms_norm_eps (`float`, defaults to 1e-6): epsilon of every RMSNorm.
        tanh_alpha_init (`float`, defaults to 0.5): initial alpha of fog-flash's tanh(alpha * x).
        xielu_alpha_init (`float`, defaults to 0.8): initial a_p and a_n of xIELU (fog-max).
        xielu_beta (`float`, defaults to 0.5): xIELU's fixed linear coefficient b.
        xielu_eps (`float`, defaults to -1e-6): xIELU clamps x at this (negative) value inside expm1.
        attention_dropout (`float`, defaults to 0.0): must be 0 (FP8 attention has no dropout).
        use_cache (`bool`, defaults to True): return a KV cache (generation). Pass False when training.
        tie_word_embeddings (`bool`, defaults to False): share the embedding and LM head weights
            (the paper ties them below 1.5B only).
        pad_token_id, bos_token_id, eos_token_id: special token ids.
    """

    model_type = "fog"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # Where a stock transformers finds the code of this model with trust_remote_code=True:
    # `save_pretrained` copies configuration_fog.py and modeling_fog.py next to the weights.
    AUTO_MAP = {
        "AutoConfig": "configuration_fog.FOGConfig",
        "AutoModel": "modeling_fog.FOGModel",
        "AutoModelForCausalLM": "modeling_fog.FOGForCausalLM",
    }
    auto_map = AUTO_MAP

    def __init__(
        self,
        variant="fog-max",
        vocab_size=32768,
        hidden_size=2048,
        intermediate_size=None,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=None,
        head_dim=None,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        softmax_scale=None,
        init_std=0.02,
        input_scale=None,
        rms_norm_eps=1e-6,
        tanh_alpha_init=0.5,
        xielu_alpha_init=0.8,
        xielu_beta=0.5,
        xielu_eps=-1e-6,
        attention_dropout=0.0,
        use_cache=True,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
        **kwargs,
    ):
        self.variant = variant
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size if intermediate_size is not None else _int_or_none(hidden_size, 6)
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else _floordiv_or_none(hidden_size, num_attention_heads)
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.softmax_scale = softmax_scale
        self.init_std = init_std
        self.input_scale = input_scale
        self.rms_norm_eps = rms_norm_eps
        self.tanh_alpha_init = tanh_alpha_init
        self.xielu_alpha_init = xielu_alpha_init
        self.xielu_beta = xielu_beta
        self.xielu_eps = xielu_eps
        self.attention_dropout = attention_dropout
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        # An instance attribute (the class attribute alone is not serialized): config.json must
        # carry auto_map for trust_remote_code loading.
        self.auto_map = dict(kwargs.pop("auto_map", None) or self.AUTO_MAP)
        kwargs.pop("model_type", None)  # a config.json names it; it is the class attribute above
        self._validate()
        # Derived defaults after validation, so that their inputs are known to be sane.
        if self.softmax_scale is None:
            self.softmax_scale = default_softmax_scale(self.head_dim)
        if self.input_scale is None:
            self.input_scale = 1.0 / self.init_std
        super().__init__(**kwargs)

    # -- derived from the variant ----------------------------------------------------------------

    @property
    def qk_guard(self) -> str:
        """The attention entropy guard on Q and K: "rmsnorm" (frozen gains) or "tanh"."""
        return FOG_VARIANTS[self.variant][0]

    @property
    def mlp_activation(self) -> str:
        """The MLP activation: "xielu" or "gelu"."""
        return FOG_VARIANTS[self.variant][1]

    # -- validation ------------------------------------------------------------------------------

    def _validate(self) -> None:
        """Raise naming the field: a bad value here would otherwise surface as a shape error deep
        inside the model, or (attention_dropout) as an FP8 attention refusing to run."""
        if self.variant not in FOG_VARIANTS:
            raise ValueError(
                f"FOGConfig.variant must be one of {', '.join(map(repr, FOG_VARIANTS))}; got {self.variant!r}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"FOGConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"FOGConfig.num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"FOGConfig.head_dim must be even (RoPE rotates pairs of channels), got {self.head_dim}")
        for name in ("rope_theta", "init_std", "rms_norm_eps", "tanh_alpha_init", "xielu_alpha_init"):
            _check_positive(name, getattr(self, name))
        for name in ("softmax_scale", "input_scale"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        if not _is_number(self.xielu_beta) or self.xielu_beta < 0:
            raise ValueError(f"FOGConfig.xielu_beta must be a number >= 0, got {self.xielu_beta!r}")
        if self.xielu_alpha_init <= self.xielu_beta:
            raise ValueError(
                f"FOGConfig.xielu_alpha_init ({self.xielu_alpha_init}) must exceed xielu_beta ({self.xielu_beta}): "
                "xIELU's a_n = xielu_beta + softplus(n) is always above xielu_beta"
            )
        if not _is_number(self.xielu_eps) or not self.xielu_eps < 0:
            raise ValueError(f"FOGConfig.xielu_eps must be a negative number, got {self.xielu_eps!r}")
        if self.attention_dropout not in (0, 0.0, None) or isinstance(self.attention_dropout, bool):
            raise ValueError(
                f"FOGConfig.attention_dropout must be 0 (FP8 attention has no dropout), got {self.attention_dropout!r}"
            )
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"FOGConfig.tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive(name: str, value) -> None:
    if not _is_number(value) or value <= 0:
        raise ValueError(f"FOGConfig.{name} must be a finite number > 0, got {value!r}")


def _int_or_none(value, factor):
    # Only derive from a valid int; an invalid hidden_size is reported by _validate under its own name.
    return value * factor if isinstance(value, int) and not isinstance(value, bool) else None


def _floordiv_or_none(a, b):
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (a, b))
    return a // b if ok else None


__all__ = ["FOGConfig", "FOG_VARIANTS", "default_softmax_scale"]
