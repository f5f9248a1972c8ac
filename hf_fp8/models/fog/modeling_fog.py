"""FOG ("fast and outlier-guarded") decoder models: FOGModel and FOGForCausalLM.

The block of "Towards Fully FP8 GEMM LLM Training at Scale" (Hernandez-Cano et al., NeurIPS 2025,
arXiv 2505.20524), built like transformers' modeling_llama.py. One FOG decoder layer, x of shape
(batch, seq, hidden):

    q, k, v = q_proj(x), k_proj(x), v_proj(x)                  no norm before attention
    q, k = guard(q), guard(k)                                   per head: frozen-gain RMSNorm or tanh(alpha*x)
    q, k = rope(q), rope(k)
    x = x + RMSNorm(o_proj(softmax(q k^T * softmax_scale) v))   post-norm, gain starts at 1/sqrt(L)
    x = x + RMSNorm(down_proj(act(up_proj(x))))                 non-gated MLP, post-norm

The model's input is the embedding times `input_scale` (1/init_std = 50), and there is no final
norm: the LM head reads the residual stream directly.

Why the guard goes before RoPE: RoPE is a rotation of each (even, odd) channel pair that makes
q_m.k_n depend on positions only through m - n. Applied after RoPE, an elementwise tanh would
bend the rotated vectors and break that relative-position property; applied before, RoPE acts on
the guarded vectors unchanged, and the guard's bound survives the rotation (rotations keep norms:
||q|| <= sqrt(head_dim) both ways, so |q.k| <= head_dim). For the frozen-gain RMSNorm the order
does not matter mathematically (it commutes with a rotation); guard-then-RoPE is also the order
of Llama-style qk-norm models (OLMo2, Qwen3) and Megatron's qk_layernorm.

Attention goes through transformers' attention interface (`config._attn_implementation`: "eager",
"sdpa", or any registered one, e.g. hf_fp8's FP8 attention "hf_fp8") with the raised softmax scale
passed as `scaling`, and masks come from `create_causal_mask`, so padding works with all of them.

Self-contained on purpose: imports only torch and transformers (never hf_fp8), so that
`save_pretrained` can ship this file as remote code. Written for transformers 5.17 to 5.x: the
KV-cache argument and output field `past_key_values` was renamed `cache` in between, and both
spellings are accepted (see CACHE_FIELD).
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_fog import FOGConfig

# The name of the KV-cache field of model outputs, which generate() reads the cache back from:
# "past_key_values" up to transformers ~5.2x, "cache" after. Forward methods accept both names.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _pick_cache(cache, past_key_values):
    """The KV cache passed under either name (`cache` or the older `past_key_values`)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


# ---------------------------------------------------------------------------------------------
# Normalizations and the attention entropy guards
# ---------------------------------------------------------------------------------------------


class FOGRMSNorm(nn.Module):
    """RMSNorm with a learnable gain, used as the post-norm of each branch.

    The gain starts at `init_gain` = 1/sqrt(num_hidden_layers) (not 1): each of the 2L branches adds
    a unit-RMS vector times the gain to the residual stream, so the stream's scale grows slowly with
    depth instead of being dominated by the last blocks."""

    def __init__(self, hidden_size: int, eps: float, init_gain: float):
        super().__init__()
        self.init_gain = init_gain
        self.variance_epsilon = eps
        self.weight = nn.Parameter(torch.full((hidden_size,), init_gain))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, init_gain={self.init_gain:.4g}"


class FOGHeadRMSNorm(nn.Module):
    """The entropy guard of fog-max and fog-opt: RMSNorm over each head's channels, gain frozen at 1.

    No weight at all (a frozen gain of 1 is the identity). Why frozen: with unit gains every
    normalized head vector has norm sqrt(head_dim), so |q.k| <= head_dim and the attention logits
    are bounded; per-tensor delayed FP8 scales of Q and K then stay valid from step to step. The
    paper saw trainable QK gains grow until FP8 attention diverged."""

    def __init__(self, eps: float):
        super().__init__()
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, seq, heads, head_dim), normalized over head_dim
        input_dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return x.to(input_dtype)

    def extra_repr(self) -> str:
        return f"eps={self.variance_epsilon}, gain=1 (frozen)"


class FOGTanh(nn.Module):
    """The entropy guard of fog-flash: elementwise tanh(alpha * x), alpha one learnable scalar.

    Bounds every entry of Q and K to (-1, 1), so |q.k| < head_dim, with one elementwise op (no
    reduction, unlike RMSNorm: the fastest guard). alpha starts at 0.5 (`config.tanh_alpha_init`)
    and is stored with shape (1,) rather than as a 0-d tensor, which FSDP cannot shard."""

    def __init__(self, init_alpha: float):
        super().__init__()
        self.init_alpha = init_alpha
        self.alpha = nn.Parameter(torch.full((1,), init_alpha))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha.to(x.dtype) * x)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------------


class FOGRotaryEmbedding(nn.Module):
    """RoPE cos/sin tables for given positions (rotate-half convention, as Llama in transformers).

    The inverse frequencies are recomputed in FP32 at every call (head_dim/2 numbers) instead of
    being a buffer: a buffer would be cast by `model.to(torch.bfloat16)`, losing precision at long
    positions, and as a non-persistent buffer it must be rebuilt by hand whenever transformers
    materializes the model from the meta device. Nothing to store, nothing to get wrong."""

    def __init__(self, config: FOGConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.rope_theta = float(config.rope_theta)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (batch or 1, seq) -> cos, sin: (batch or 1, seq, head_dim) in x's dtype
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=x.device) / self.head_dim
        inv_freq = 1.0 / (self.rope_theta**exponents)  # (head_dim / 2,)
        freqs = position_ids[..., None].to(torch.float32) * inv_freq  # (batch, seq, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (batch, seq, head_dim)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates half the hidden dims of the input."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """RoPE on q (batch, heads, seq, head_dim) and k (batch, kv_heads, seq, head_dim); cos and sin
    (batch, seq, head_dim) are unsqueezed at `unsqueeze_dim` to broadcast over the heads."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


# ---------------------------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------------------------


class FOGXIELU(nn.Module):
    """xIELU activation (fog-max), with learnable a_p and a_n per layer:

        x > 0:   a_p * x^2 + b * x
        x <= 0:  a_n * expm1(min(x, eps)) - a_n * x + b * x

    a_p = softplus(p) and a_n = b + softplus(n) keep a_p > 0 and a_n > b; p and n are initialised
    so that a_p = a_n = `alpha_init` (0.8): p = log(expm1(0.8)), n = log(expm1(0.8 - b)).
    b = 0.5 and eps = -1e-6 are fixed. Clamping at eps (not 0) keeps expm1's argument strictly
    negative, where the x <= 0 branch and its gradient are well defined."""

    def __init__(self, alpha_init: float, beta: float, eps: float):
        super().__init__()
        self.alpha_init = alpha_init
        self.beta = beta
        self.eps = eps
        # shape (1,), not 0-d: FSDP shards parameters along dim 0.
        self.alpha_p = nn.Parameter(torch.full((1,), self.p_init()))
        self.alpha_n = nn.Parameter(torch.full((1,), self.n_init()))

    def p_init(self) -> float:
        return math.log(math.expm1(self.alpha_init))  # inverse softplus of a_p

    def n_init(self) -> float:
        return math.log(math.expm1(self.alpha_init - self.beta))  # inverse softplus of a_n - b

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_p, a_n), each of shape (1,)."""
        return F.softplus(self.alpha_p), self.beta + F.softplus(self.alpha_n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_p, a_n = (a.to(x.dtype) for a in self.coefficients())
        positive = a_p * x * x + self.beta * x
        negative = a_n * torch.expm1(x.clamp(max=self.eps)) - a_n * x + self.beta * x
        return torch.where(x > 0, positive, negative)

    def extra_repr(self) -> str:
        return f"alpha_init={self.alpha_init}, beta={self.beta}, eps={self.eps}"


class FOGMLP(nn.Module):
    """Non-gated MLP: down_proj(act(up_proj(x))), no biases. It is 1.5x wider than a gated MLP of
    the same parameter count (config.intermediate_size). GeLU is the exact (erf) GeLU."""

    def __init__(self, config: FOGConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        if config.mlp_activation == "xielu":
            self.act_fn = FOGXIELU(config.xielu_alpha_init, config.xielu_beta, config.xielu_eps)
        else:
            self.act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, seq, hidden) -> (batch, seq, intermediate) -> (batch, seq, hidden)
        return self.down_proj(self.act_fn(self.up_proj(x)))


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, head_dim) -> (batch, kv_heads * n_rep, seq, head_dim), like
    torch.repeat_interleave(x, n_rep, dim=1)."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    """Plain PyTorch attention: query (B, Hq, Q, D), key/value (B, Hkv, K, D) -> ((B, Q, Hq, D), weights)."""
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask

    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


class FOGAttention(nn.Module):
    """Grouped-query attention with the FOG entropy guard on Q and K and a raised softmax scale.

    `q_guard`/`k_guard`: FOGHeadRMSNorm (fog-max, fog-opt; no parameters) or FOGTanh (fog-flash;
    one learnable alpha each), applied per head before RoPE (see the module docstring for why)."""

    def __init__(self, config: FOGConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = config.softmax_scale
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_guard == "tanh":
            self.q_guard = FOGTanh(config.tanh_alpha_init)
            self.k_guard = FOGTanh(config.tanh_alpha_init)
        else:
            self.q_guard = FOGHeadRMSNorm(config.rms_norm_eps)
            self.k_guard = FOGHeadRMSNorm(config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]  # (batch, seq)
        hidden_shape = (*input_shape, -1, self.head_dim)  # (batch, seq, heads, head_dim)

        # Guard per head on (batch, seq, heads, head_dim), then -> (batch, heads, seq, head_dim).
        query_states = self.q_guard(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        key_states = self.k_guard(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,  # (batch, heads, seq, head_dim)
            key_states,  # (batch, kv_heads, kv_seq, head_dim)
            value_states,  # (batch, kv_heads, kv_seq, head_dim)
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )  # attn_output: (batch, seq, heads, head_dim)

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # (batch, seq, heads * head_dim)
        attn_output = self.o_proj(attn_output)  # (batch, seq, hidden)
        return attn_output, attn_weights


# ---------------------------------------------------------------------------------------------
# Decoder layer
# ---------------------------------------------------------------------------------------------


class FOGDecoderLayer(GradientCheckpointingLayer):
    """x = x + RMSNorm(Attn(x)); x = x + RMSNorm(MLP(x)). No pre-norm: the branches see the raw
    residual stream (no `input_layernorm`), and each branch's output is normalized before it is
    added, which keeps the residual stream free of the outliers that pre-norm blocks grow."""

    def __init__(self, config: FOGConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        init_gain = 1.0 / math.sqrt(config.num_hidden_layers)
        self.self_attn = FOGAttention(config=config, layer_idx=layer_idx)
        self.post_attention_layernorm = FOGRMSNorm(config.hidden_size, config.rms_norm_eps, init_gain)
        self.mlp = FOGMLP(config)
        self.post_feedforward_layernorm = FOGRMSNorm(config.hidden_size, config.rms_norm_eps, init_gain)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> torch.Tensor:
        # hidden_states: (batch, seq, hidden)
        attn_output, _ = self.self_attn(
            hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = hidden_states + self.post_attention_layernorm(attn_output)
        hidden_states = hidden_states + self.post_feedforward_layernorm(self.mlp(hidden_states))
        return hidden_states


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class FOGPreTrainedModel(PreTrainedModel):
    config_class = FOGConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["FOGDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """normal(0, init_std) for every linear and embedding weight; the FOG scalars at their
        configured starting values. torch.nn.init is used because transformers guards it during
        initialization, so weights loaded from a checkpoint are never overwritten."""
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, FOGRMSNorm):
            nn.init.constant_(module.weight, module.init_gain)
        elif isinstance(module, FOGTanh):
            nn.init.constant_(module.alpha, module.init_alpha)
        elif isinstance(module, FOGXIELU):
            nn.init.constant_(module.alpha_p, module.p_init())
            nn.init.constant_(module.alpha_n, module.n_init())


class FOGModel(FOGPreTrainedModel):
    """The FOG decoder stack: scaled embeddings -> L FOG blocks, no final norm. Returns the last
    hidden state (batch, seq, hidden)."""

    def __init__(self, config: FOGConfig):
        super().__init__(config)
        self.vocab_size = config.vocab_size
        # No padding_idx: padded positions are masked out of attention and loss, so the pad row
        # needs no special (zero, frozen) treatment.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [FOGDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.rotary_emb = FOGRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        cache = _pick_cache(cache, past_key_values)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if self.gradient_checkpointing and self.training:
            # The backward recomputation would append to the cache a second time.
            use_cache, cache = False, None

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (batch, seq, hidden)

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)  # (1, seq)

        # Positional arguments: the 4th one is named `past_key_values` in transformers 5.17 and
        # `cache` later.
        causal_mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)

        # Input scaling: the embeddings start at std init_std (0.02); x input_scale (50) brings the
        # residual stream to unit scale, which the unnormalized branches need to see.
        hidden_states = inputs_embeds * self.config.input_scale
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        all_hidden_states = () if output_hidden_states else None
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = decoder_layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                **kwargs,
            )
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            **{CACHE_FIELD: cache if use_cache else None},
        )
        return output if return_dict else output.to_tuple()


class FOGForCausalLM(FOGPreTrainedModel, GenerationMixin):
    """FOGModel with a linear LM head reading the residual stream directly (no final norm)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FOGConfig):
        super().__init__(config)
        self.model = FOGModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""labels (batch, seq): next-token targets (shifted inside the loss), -100 to ignore.
        logits_to_keep: compute logits for the last N positions only (0: all), or for the given indices."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_pick_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )

        hidden_states = outputs.last_hidden_state  # (batch, seq, hidden)
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])  # (batch, kept seq, vocab)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
        return output if return_dict else output.to_tuple()


__all__ = ["FOGPreTrainedModel", "FOGModel", "FOGForCausalLM"]
