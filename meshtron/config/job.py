"""The training configuration: one typed dataclass per TOML section, a docstring per field.

Every field has a default, so an empty TOML file is a valid (tiny, mock-data) run. The field
docstrings are the reference documentation of the config (docs/training.md points here and
`describe()` prints them); `meshtron.config.loader` reads them from this file's source.
"""

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    name_or_path: str = "llama:debug"
    """A registered flavor ("llama:debug", see meshtron.models.registry.flavor_names), a Hugging
    Face model directory, a meshtron checkpoint (a run directory or its checkpoints/step-N), or
    "smollm2" for the example model SmolLM2-135M-Instruct (prepared on first use)."""

    args: dict = field(default_factory=dict)
    """ModelArgs fields to change on a flavor, e.g. {num_layers = 4, dim = 256}; only for
    flavors (pretrained weights fix their shape), except the context (max_seq_len, rope_scaling:
    RoPE scaling such as YaRN, configs/smollm2/sft_long.toml) and an MoE model's routing fields,
    which a pretrained one takes too (set those in [moe])."""

    tokenizer: str = ""
    """Tokenizer directory (or "smollm2"); empty means the model's own (HF directory or
    checkpoint). Needed for on-the-fly preprocessing and the end-of-run sample."""

    dtype: str = "auto"
    """Compute dtype of forward and backward: auto, float32, bfloat16 or float16. auto is bfloat16
    on CUDA (mixed precision with the float32 master weights of master_dtype, and TF32 allowed for
    the matmuls that stay float32) and float32 elsewhere."""

    master_dtype: str = "float32"
    """Dtype of the stored parameters, gradient reduction and optimizer state. float32 with a
    lower `dtype` is mixed precision with fp32 master weights; equal to `dtype` is pure
    low-precision training (e.g. both bfloat16)."""

    attention: str = "auto"
    """Attention kernel, chosen per batch: auto (SDPA's causal fast path for rows without document
    boundaries; packed documents through flex on GPU and varlen on CPU), sdpa (causal fast path,
    else a dense mask), flex (FlexAttention block masks; GPU for training), varlen (one SDPA call
    per document) or dense (a dense mask always)."""

    mtp_loss_weight: float = 0.0
    """Weight of the multi-token prediction loss (DeepSeek-V3's MTP modules, num_nextn_predict_layers):
    the mean over MTP depths of each depth's cross-entropy, added to the pretrain and sft loss and logged
    as mtp_loss. 0: the MTP modules are not run."""


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)
    """Dataset prefixes written by `meshtron preprocess` (PREFIX of PREFIX_text_document.bin or
    PREFIX_packed_*_document.bin), or raw .jsonl/.json/.parquet/.txt files that are preprocessed
    on the fly into OUTPUT_DIR/data with `handler`. A relative path is looked up in the current
    directory, then in the config file's directory and its parents."""

    weights: list[float] = field(default_factory=list)
    """Blend weights, one per path; empty means proportional to the datasets' sizes."""

    handler: str = ""
    """Preprocess handler for raw files (pretrain, alpaca, sharegpt, openai, pairwise, prm); empty
    picks the recipe's: "pretrain" for pretrain, "alpaca" for sft, "pairwise" for dpo, simpo and rm,
    "prm" for prm. grpo and ppo read prompt files (docs/rl.md) and take no handler."""

    handlers: dict = field(default_factory=dict)
    """Handlers of single raw files, keyed by the path as written in `paths` or `eval_paths`, e.g.
    {"data/chats.jsonl" = "sharegpt"}; the others use `handler`. Lets one run mix alpaca and
    ShareGPT files."""

    skip_bad_lines: bool = False
    """Skip (and count) malformed or incomplete records of raw files instead of stopping at the
    first, as `meshtron preprocess --skip-bad-lines` does."""

    eval_paths: list[str] = field(default_factory=list)
    """Held-out data (prefixes or raw files, like `paths`): its loss is measured before training, every
    train.eval_interval steps and at the end, and logged as eval_loss."""

    num_workers: int = 0
    """Micro-batches prepared ahead by a background worker thread while the model computes
    (0: prepared in the training loop)."""

    mock: bool = False
    """Train on deterministic random tokens instead of files (benchmarks, smoke tests)."""

    reset_position_ids: bool = True
    """Restart position ids at every document of a packed sequence; false keeps them running
    across documents (attention is reset at document boundaries either way)."""


@dataclass
class TrainConfig:
    recipe: str = "pretrain"
    """How a batch becomes a loss: pretrain (next-token loss on packed documents), sft
    (next-token loss on response tokens only), dpo or simpo (pairwise preferences, see [align]),
    prm (process reward model on step-labelled data), grpo or ppo (online reinforcement learning on
    prompts: the model generates, rewards score it; ppo with a critic; see [rl] and docs/rl.md)."""

    steps: int = 10
    """Number of optimizer steps of the run (resuming continues up to this count)."""

    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks; gradient accumulation runs
    global_batch_size / (micro_batch_size * data-parallel size) micro-batches per step."""

    micro_batch_size: int = 2
    """Sequences per forward/backward on one data-parallel rank."""

    seq_length: int = 128
    """Tokens per sequence."""

    seed: int = 0
    """Seed of weight initialization, data order and every random number generator."""

    output_dir: str = "runs/default"
    """Run directory: config.toml, metrics.jsonl, checkpoints/, tensorboard/, loss.png."""

    deterministic: bool = False
    """Use deterministic algorithms only, so that two runs of one config give bit-identical
    losses (slower on GPU)."""

    compile: bool | str = "auto"
    """Compile each transformer block with torch.compile (regional compilation: one compile
    serves every block): true, false or "auto" (on CUDA, where steps are faster after a compile
    of tens of seconds; off elsewhere, where the compile costs more than it saves)."""

    float8: str = ""
    """Float8 training of the transformer blocks' linear layers through torchao's float8 linear
    conversion: "" (off), tensorwise (one scale per tensor) or rowwise (one per row, more accurate).
    Matmuls run in float8 on GPUs that have it (compute capability 8.9 and up, best with compile)
    and are emulated in the compute dtype elsewhere; weights, checkpoints and HF export are
    unchanged. Needs torchao; not with LoRA or tensor parallel."""

    eval_interval: int = 0
    """Measure the held-out loss (data.eval_paths) every this many steps; 0 means only before and
    after training."""

    sample_prompt: str = ""
    """Text to continue with the final model at the end of the run (printed and written to
    OUTPUT_DIR/sample.txt); empty means no sample. Needs a tokenizer."""

    sample_max_new_tokens: int = 40
    """Number of tokens the end-of-run sample generates."""

    sample_temperature: float = 0.0
    """Temperature of the end-of-run sample; 0 is greedy decoding. Sampling draws from a generator
    seeded with train.seed, so a run's sample is reproducible."""

    sample_top_k: int = 0
    """The end-of-run sample draws only among this many most likely tokens (0: all of them)."""

    max_skipped_steps: int = 3
    """A step whose loss or gradient norm is not finite on some rank is skipped (not applied on any
    rank, counted as skipped_steps in metrics.jsonl); after this many skipped steps in a row the run
    stops with an error naming the last good checkpoint."""

    loss_spike_factor: float = 0.0
    """Warn (and count loss_spikes in metrics.jsonl) when a step's loss is above this many times the
    median loss of the last 50 steps, e.g. 2.0; 0 disables. Spikes are reported, not skipped."""

    hang_timeout_s: float = 0.0
    """Hang watchdog: when no step completes within this many seconds (a stuck collective, a dead
    peer, a deadlock), every rank writes its Python stacks to OUTPUT_DIR/hang/rank-N.txt (on NCCL
    also the flight recorder's dump) and the job exits with status 124, so that torchrun
    --max-restarts can restart it. Evaluations and checkpoint saves count as progress. Set it well
    above the slowest step (the first, with compilation, included); 0 disables the watchdog."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimizer: adamw (fused kernel where the device has one) or sgd."""

    lr: float = 3e-4
    """Peak learning rate (reached after warmup)."""

    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not to norms, biases or embeddings)."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW's (beta1, beta2)."""

    eps: float = 1e-8
    """AdamW's epsilon."""

    momentum: float = 0.9
    """SGD momentum."""

    grad_clip: float = 1.0
    """Clip gradients to this global L2 norm (over all shards); 0 disables clipping."""


@dataclass
class LRConfig:
    schedule: str = "cosine"
    """constant, cosine, linear (decay to min_lr) or wsd (warmup-stable-decay)."""

    warmup_steps: int = 0
    """Steps of linear warmup from 0 to the peak lr."""

    min_lr: float = 0.0
    """Learning rate at the end of the decay."""

    decay_ratio: float = 0.2
    """wsd only: fraction of the steps after warmup spent in the final linear decay."""


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    """Data-parallel replicas: DDP on its own, HSDP (replicate x shard) with dp_shard > 1."""

    dp_shard: int = -1
    """FSDP2 degree (parameters, gradients and optimizer state sharded: ZeRO-3); -1 means
    whatever the other degrees leave of the world size."""

    tp: int = 1
    """Tensor-parallel degree (attention heads and MLP columns split across ranks)."""

    sequence_parallel: bool = True
    """With tp > 1, also split norms and residual activations along the sequence."""

    pp: int = 1
    """Pipeline-parallel degree: the layers are split into pp stages (torch.distributed.pipelining),
    each on its own group of ranks; the global batch is cut into micro-batches that flow through
    them (their number is global_batch_size / (micro_batch_size x data-parallel size))."""

    pp_schedule: str = ""
    """Pipeline schedule: gpipe, 1f1b, interleaved_1f1b (several virtual stages per rank) or zbv
    (zero-bubble V: exactly two stages per rank). Empty: 1f1b, or interleaved_1f1b when vpp > 1."""

    vpp: int = 1
    """Virtual pipeline stages per rank (interleaving; Megatron's virtual pipeline size). zbv
    always uses 2."""

    pp_layers: list[int] = field(default_factory=list)
    """Layers of each stage, in pipeline order, e.g. [3, 5] (MindSpeed-LLM's --num-layer-list);
    pp x vpp numbers that sum to the model's layers. Empty: as even as possible, the earlier
    stages taking the remainder (the last stage also runs the output head)."""

    cp: int = 1
    """Context-parallel degree: each sequence is split over cp ranks (load-balanced: 2 x cp chunks,
    rank r holding chunks r and 2 x cp - 1 - r) and attention spans them (docs/parallelism.md).
    train.seq_length must be divisible by 2 x cp. Every recipe but grpo and ppo."""

    cp_algo: str = "ring"
    """How attention spans the cp ranks: ring (key/value blocks rotate around the ranks), ulysses
    (all-to-all from sequence to head shards; heads per tp rank divisible by cp) or hybrid (ulysses
    inside groups of cp_ulysses ranks, ring across them)."""

    cp_ulysses: int = 0
    """hybrid only: the Ulysses degree inside cp (a divisor of cp strictly between 1 and cp); the
    ring degree is cp / cp_ulysses."""

    ep: int = 1
    """Expert-parallel degree: each MoE layer's experts are split over ep ranks, which are data-parallel
    ranks for the rest of the model (ep divides dp_shard x cp and adds no processes)."""


@dataclass
class RecomputeConfig:
    mode: str = "none"
    """Activation recompute: none, selective (the attention core of each chosen layer), op (each chosen
    layer keeps its matmul and attention outputs and recomputes the cheap ops; no graph break under
    train.compile) or full (each chosen layer whole)."""

    num_layers: int = 0
    """How many layers (from the first) recompute; 0 means all of them."""


@dataclass
class CheckpointConfig:
    interval: int = 0
    """Save every this many steps (0: only at the end of the run and on SIGTERM/SIGINT)."""

    keep: int = 2
    """Keep the newest this many complete checkpoints (0 keeps all)."""

    resume: str = "auto"
    """auto (continue from the newest complete checkpoint in OUTPUT_DIR if any), none (start
    fresh), or the path of a checkpoint to continue from."""

    async_: bool = False
    """TOML key `async`: write checkpoints in a background thread while training continues."""

    save_final: bool = True
    """Save a checkpoint when the run reaches train.steps."""

    verify: bool = True
    """Before resuming, check the checkpoint's files against the checksums in its manifest (CRC-32,
    each rank reading a share; `meshtron checkpoint verify PATH` runs the same check by hand);
    false skips the check."""


@dataclass
class LoRAConfig:
    rank: int = 0
    """LoRA rank; 0 trains the full model (no adapters)."""

    alpha: float = 16.0
    """LoRA scaling numerator: the adapter's output is multiplied by alpha / rank."""

    dropout: float = 0.0
    """Dropout on the adapter's input."""

    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """Linear layers that get adapters: names among q_proj, k_proj, v_proj, o_proj, gate_proj,
    up_proj, down_proj, or "all-linear" (all of them; the output head never)."""

    bias: str = "none"
    """Which biases train beside the adapters: none, all, or lora_only (those of adapted layers)."""

    quantize_base: str = ""
    """"nf4" stores the frozen base weights in NF4 (QLoRA, needs torchao); empty keeps them in
    model.master_dtype."""


@dataclass
class AlignConfig:
    beta: float = 0.1
    """DPO: strength of the KL tie to the reference; SimPO: scale of the length-normalized reward."""

    loss_type: str = "sigmoid"
    """DPO loss: sigmoid (the DPO paper), hinge (SLiC) or ipo (IPO, on length-averaged log-probs)."""

    label_smoothing: float = 0.0
    """Assumed fraction of flipped preference labels (conservative DPO / SimPO); 0 disables."""

    reference: str = "auto"
    """DPO reference model: copy (a frozen copy of the starting model), lora (the model with its
    adapters off; LoRA runs only, no extra memory), precomputed (the starting model's log-probs of
    every training and held-out pair, computed in one no-grad pass before the first step; no
    reference model while training) or auto (lora for LoRA runs, else copy)."""

    sft_weight: float = 0.0
    """Weight of an added language-model loss (mean token NLL) on the chosen response."""

    simpo_gamma: float = 0.5
    """SimPO target reward margin gamma."""

    rm_margin: float = 0.0
    """Reward model: margin in the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin)."""

    prm_good_token: str = "+"
    """PRM: the token whose logit (against prm_bad_token) scores a step as good."""

    prm_bad_token: str = "-"
    """PRM: the token whose logit scores a step as bad."""


@dataclass
class RLConfig:
    prompts_per_step: int = 4
    """grpo, ppo: prompts each optimizer step rolls out, over all data-parallel ranks (each rank takes an
    equal share; a prompt's group of completions stays on one rank). train.global_batch_size must
    be prompts_per_step x group_size (the completions trained on per step)."""

    group_size: int = 4
    """Completions sampled per prompt; a completion's advantage is its reward against its group's."""

    max_new_tokens: int = 64
    """Longest completion of the rollout, in tokens (a longer one is cut: truncated_fraction)."""

    temperature: float = 1.0
    """Sampling temperature of the rollout (> 0)."""

    top_p: float = 1.0
    """Nucleus sampling of the rollout: draw among the most likely tokens holding this much
    probability (1.0: all tokens)."""

    loss_type: str = "dapo"
    """How per-token losses are averaged: grpo (per completion, then over completions), dapo (over
    all completion tokens of the step), dr_grpo (per completion divided by max_new_tokens, then
    over completions; pair it with scale_rewards = false) or bnpo (per micro-batch, then over
    micro-batches)."""

    scale_rewards: bool = True
    """Divide each advantage by its group's reward std (+ 1e-4); false only centres the rewards
    (Dr. GRPO)."""

    clip_low: float = 0.2
    """The probability ratio to the rollout policy is clipped below at 1 - clip_low."""

    clip_high: float = 0.2
    """... and above at 1 + clip_high (DAPO's clip-higher uses 0.28)."""

    kl_coef: float = 0.0
    """Weight of the per-token KL penalty to a frozen copy of the starting model; 0 builds no
    reference model."""

    kl_estimator: str = "k3"
    """KL estimate per token from the sampled token's log-probs: k1 (log-ratio), k2 (half its
    square) or k3 (exp(ref - logp) - (ref - logp) - 1, unbiased and never negative)."""

    updates_per_rollout: int = 1
    """Optimizer steps on each rollout (TRL's num_iterations); above 1, the rollout policy's
    log-probs are kept for the ratio."""

    gamma: float = 1.0
    """ppo: discount of GAE over the completion's tokens."""

    lam: float = 0.95
    """ppo: GAE's lambda (1: the reward-to-go minus the value, lower: more of the critic's estimate)."""

    value_clip: float = 0.2
    """ppo: the critic's prediction is kept within value_clip of its rollout-time value (clipped value loss)."""

    critic_lr: float = 0.0
    """ppo: learning rate of the critic's own AdamW (optim's other settings, constant lr); 0 uses optim.lr."""

    critic: str = ""
    """ppo: where the critic starts: "" a value head (drawn) on a copy of the starting model, or the
    run directory (or checkpoint, or HF export) of an rm run, whose model and score head it continues
    from (it must share the policy's vocabulary)."""

    rewards: dict = field(default_factory=lambda: {"math": 1.0})
    """Reward functions and their weights, e.g. {math = 1.0, format = 0.2}: math (the completion's
    last \\boxed{} or last number equals the prompt's `answer`), format (format_pattern matches
    the whole completion), code (the completion's code then the prompt's `tests` exit 0 in the
    evaluation sandbox), model (the score of the rm run reward_model), or a user function by
    import path, {"mypkg.rewards:brevity" = 0.1}, called as f(prompts, completions, **fields) with
    the prompt records' other fields, returning one float per completion."""

    format_pattern: str = ".*"
    """The format reward's regular expression (Python syntax, matched against the whole stripped
    completion, `.` matching newlines too)."""

    reward_model: str = ""
    """The model reward's reward model: the run directory (or checkpoint) of an rm run."""

    code_timeout_s: float = 10.0
    """The code reward's time limit per program, in seconds."""

    code_sandbox: bool = True
    """Run the code reward's programs confined by the kernel, as `meshtron eval` runs HumanEval;
    false runs generated code unconfined (at your own risk)."""


@dataclass
class MoEConfig:
    """An MoE model's router and balancing settings (docs/moe.md). Unset keys keep the model's own
    value: its flavor's, or a Hugging Face config's (router_aux_loss_coef), or a checkpoint's."""

    aux_loss_coef: float | None = None
    """Weight of the load-balancing loss (Switch / Mixtral); 0 turns it off."""

    seq_aux_loss_coef: float | None = None
    """Weight of DeepSeek-V3's sequence-wise balance loss; 0 turns it off."""

    z_loss_coef: float | None = None
    """Weight of the router z-loss (ST-MoE); 0 turns it off."""

    bias_update_rate: float | None = None
    """Auxiliary-loss-free balancing (DeepSeek-V3): after each step every expert's routing bias
    moves by this much towards balance; 0 turns it off."""

    capacity_factor: float | None = None
    """Rows an expert takes per forward, at most ceil(factor x tokens x top-k / experts); the rest are
    dropped (logged as moe_dropped). Unset: the model's own, dropless unless it sets one."""


@dataclass
class LogConfig:
    interval: int = 1
    """Log metrics every this many steps."""

    tensorboard: bool = True
    """Write TensorBoard event files to OUTPUT_DIR/tensorboard."""

    plot: bool = True
    """Draw the loss curve to OUTPUT_DIR/loss.png at the end of the run (and an MoE model's expert load to
    OUTPUT_DIR/expert_load.png)."""

    straggler_fraction: float = 0.2
    """Warn, naming the rank, when one rank's data wait exceeds the other ranks' median by more than this
    fraction of the step time at 3 logged steps in a row (see docs/training.md, Operations); 0
    disables the check."""


@dataclass
class ProfileConfig:
    enable: bool = False
    """Profile steps start_step .. start_step + num_steps - 1 with torch.profiler: one gzipped
    Chrome trace per rank under OUTPUT_DIR/profile/ (open it in https://ui.perfetto.dev or
    TensorBoard), with regions named data, forward_backward (forward, backward), optimizer."""

    start_step: int = 2
    """First profiled step (the step before it, if this run trains it, warms the profiler up)."""

    num_steps: int = 2
    """How many steps to profile (fewer when the run ends earlier)."""

    memory_snapshot: bool = False
    """Also record memory over the profiled steps: on GPU the CUDA caching allocator's history
    (OUTPUT_DIR/profile/.../rank-N.memory.pickle, rendered to rank-N.memory.html); on CPU the
    profiler's memory timeline (rank-N.memory.html). Slows the profiled steps down."""

    record_shapes: bool = False
    """Record the input shapes of each operator in the trace."""

    with_stack: bool = False
    """Record the Python stack of each operator in the trace (larger trace, slower steps)."""


@dataclass
class FTConfig:
    enable: bool = False
    """Replica fault tolerance with torchft (pip install 'meshtron[ft]'): this job is one replica
    group among ft.num_replica_groups that train together; a dead group does not stop the others,
    and a replacement heals from a live one. See docs/training.md, Operations."""

    lighthouse: str = ""
    """Address of the torchft lighthouse (http://HOST:29510); empty: $TORCHFT_LIGHTHOUSE."""

    replica_group: int = 0
    """This job's replica group, 0 .. num_replica_groups - 1 (its share of the data)."""

    num_replica_groups: int = 1
    """How many replica groups train together (the data is split over them)."""

    min_replicas: int = 1
    """The fewest replica groups a step commits with."""

    timeout_s: float = 60.0
    """How long collectives between replica groups, quorum and healing may take."""


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    ft: FTConfig = field(default_factory=FTConfig)
