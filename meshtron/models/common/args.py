"""The flat argument set of the dense decoder shared by the llama, mistral, qwen2 and qwen3 families.

Each family folder names its flavors as `ModelArgs` instances and translates
Hugging Face `config.json` to and from these fields.
"""

from dataclasses import asdict, dataclass, field, fields

# Fields that extend a pretrained model's context (RoPE scaling, e.g. YaRN) without changing the shape
# of its weights: model.args may set them on any model, not only a flavor.
CONTEXT_FIELDS = frozenset({"max_seq_len", "rope_scaling"})


@dataclass
class ModelArgs:
    family: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    # Hugging Face `rope_parameters` minus rope_theta: {"rope_type": "linear"|"dynamic"|"llama3"|"yarn", ...};
    # None means plain RoPE.
    rope_scaling: dict | None = None
    partial_rotary: float = 1.0  # the fraction of each head's dims that RoPE rotates (the first ones)
    qkv_bias: bool = False  # bias on q/k/v projections (qwen2; llama's attention_bias)
    out_bias: bool = False  # bias on the attention output projection (llama's attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (qwen3)
    sliding_window: int | None = None
    # Indices of layers that use the sliding window; empty with a window set means "all layers".
    sliding_layers: tuple[int, ...] = field(default_factory=tuple)
    tie_embeddings: bool = False
    init_std: float = 0.02
    # 0: a language-model head over the vocabulary. > 0: a score head with this many outputs
    # (reward models; Hugging Face's *ForSequenceClassification `score` layer), never tied.
    num_labels: int = 0

    def __post_init__(self):
        self.sliding_layers = tuple(self.sliding_layers)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def head_is_tied(self) -> bool:
        """Whether the output head is the embedding matrix: the one place this rule is decided (a score
        head never is)."""
        return self.tie_embeddings and not self.num_labels

    def layer_uses_window(self, layer_id: int) -> bool:
        if self.sliding_window is None:
            return False
        return not self.sliding_layers or layer_id in self.sliding_layers

    def attention_params(self) -> int:
        """One layer's attention parameters (a family with another attention overrides this)."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = self.dim * (q + 2 * kv) + q * self.dim
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.out_bias:
            attn += self.dim
        if self.qk_norm:
            attn += 2 * self.head_dim
        return attn

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count from the shapes alone (no model needed)."""
        attn = self.attention_params()
        mlp = 3 * self.dim * self.ffn_dim + (2 * self.ffn_dim + self.dim if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * self.dim
        total = self.num_layers * per_layer + self.dim
        head = self.num_labels * self.dim if self.num_labels else (0 if self.head_is_tied else self.vocab_size * self.dim)
        if include_embedding:
            total += self.vocab_size * self.dim + head
        else:
            total += head  # the output head still costs compute
        return total

    def num_active_params(self, include_embedding: bool = True) -> int:
        """The parameters one token goes through (FLOPs, MFU): all of them in a dense model."""
        return self.num_params(include_embedding)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        """The args of a dict written by `to_dict` (a manifest, a flavor with overrides).

        Strict: a field this release does not know is an error, never silently dropped (a
        manifest from a newer model layer would otherwise build a different model)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model args field(s) {', '.join(map(repr, unknown))} for the "
                             f"{d.get('family', cls.family)} family; known fields: {', '.join(sorted(known))}")
        return cls(**d)
