"""The run config's schema: one dataclass per section, defaults written once here.

A run is described by one :class:`RunConfig` holding a :class:`DataConfig`, a
:class:`ModelConfig` (itself holding the Mogrifier's, the Transformer's and the output
layer's settings) and a :class:`TrainConfig`. The choice lists the fields take are
defined by the modules that use them (the corpus registry, the model builders, the
layers, the training policies, the runtime) and only imported here.

``version`` is the schema's version, saved in every config.yaml and checkpoint:
:mod:`moglstm.lm.config.upgrade` turns a config of an older version into this one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "CONFIG_VERSION",
    "DataConfig",
    "ModelConfig",
    "MogrifierSettings",
    "OutputSettings",
    "RunConfig",
    "TrainConfig",
    "TransformerSettings",
]

#: The version of the schema below, saved as ``version`` in every config. Version 1
#: (no ``version`` key) had the model's keys flat (``model.mogrify_rounds``).
CONFIG_VERSION = 2


@dataclass
class DataConfig:
    """Which corpus to read and how to cut it into training windows.

    See :mod:`moglstm.lm.data` for the meaning of each corpus; ``corpus="text"``
    reads the user's own files from ``path`` (a folder holding train.txt,
    valid.txt and test.txt) or from ``train_path``/``valid_path``/``test_path``.
    """

    corpus: str = "ptb"  # a name of moglstm.lm.data.sources.CORPORA
    data_dir: str | None = None  # folder laid out like shared/data; else $MOGLSTM_DATA
    cache_dir: str | None = None  # where downloads go; else ~/.cache/moglstm
    path: str | None = None  # corpus=text: a folder with train/valid/test.txt
    train_path: str | None = None  # corpus=text: explicit files instead of `path`
    valid_path: str | None = None
    test_path: str | None = None
    level: str = "word"  # corpus=text: word | char | byte
    batch_size: int = 64
    bptt: int = 70
    variable_length: bool = False  # AWD-LSTM style random window lengths
    eval_batch_size: int = 10


@dataclass
class MogrifierSettings:
    """The Mogrifier layer's own settings (``model.kind="mogrifier"``; see moglstm.nn)."""

    rounds: int = 5  # mogrifier rounds; 0 gives a plain LSTM cell
    rank: int | None = None  # rank of the round matrices; None: full rank
    coupled: bool = False  # coupled input and forget gates
    peephole: bool = False
    cap_input_gate: bool = False
    implementation: str = "auto"  # as moglstm.nn.MogrifierLSTM takes: auto | fused | ...


@dataclass
class TransformerSettings:
    """The causal Transformer's settings (``model.kind="transformer"``)."""

    d_model: int = 256
    heads: int = 4
    depth: int = 2
    ffn_size: int | None = None  # None: 4 * d_model
    positional: bool = True
    positional_kind: str = "sinusoidal"  # sinusoidal | learned (when positional)
    max_len: int = 1024
    dropout: float = 0.1  # transformer dropout


@dataclass
class OutputSettings:
    """The recurrent models' output layer: the softmax and what feeds it."""

    tie_weights: bool = True  # projection added when embedding_size != hidden_size
    sum_layer_outputs: bool = False  # output = sum of all layers' outputs (skip connections)
    mos_components: int = 1  # mixture of softmaxes with K components; 1: a plain softmax
    mos_dropout: float = 0.0  # dropout on the mixture's component vectors (K > 1)
    projection_dropout: float = 0.0  # dropout after the hidden -> embedding projection (K = 1)


@dataclass
class ModelConfig:
    """The language model: a recurrent core (``kind`` mogrifier/lstm/gru/rnn) or a
    causal Transformer (``kind="transformer"``, which uses only ``transformer``).
    """

    kind: str = "mogrifier"  # mogrifier | lstm | gru | rnn | transformer
    # recurrent models
    hidden_size: int = 256
    embedding_size: int | None = None  # None: same as hidden_size
    num_layers: int = 2
    embedding_dropout: float = 0.0  # drops whole word types
    input_dropout: float = 0.0  # on the embedding output
    layer_dropout: float = 0.0  # between recurrent layers
    state_dropout: float = 0.0  # on h fed back (mogrifier core only)
    output_dropout: float = 0.0  # on the last layer's output, before the softmax
    # the paper's regularisation and initialisation (recurrent models; docs/reproduce.md)
    dropout_mask: str = "window"  # window: one mask per window (variational) | step: fresh per step
    state_dropout_mask: str | None = None  # window | step for state dropout; None: dropout_mask
    drop_state_probability: float = 0.0  # zero each stream's carried state w.p. this, per batch
    forget_bias: float = 0.0  # added to the forget-gate bias at init (mogrifier/lstm)
    init: str = "default"  # default | official: lamb's variance-scaling truncated normal
    embedding_init_factor: float = 1.0  # init=official: variance scale of the embedding
    cell_init_factor: float = 1.0  # init=official: ... of the recurrent layers
    output_init_factor: float = 1.0  # init=official: ... of the softmax layer (untied) and MoS
    embedding_ratio: float | None = None  # embedding_size = round(ratio * hidden_size)
    num_params: str | None = None  # budget ("24M", "24e6", 24000000): picks the hidden_size
    mogrifier: MogrifierSettings = field(default_factory=MogrifierSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    transformer: TransformerSettings = field(default_factory=TransformerSettings)


@dataclass
class TrainConfig:
    """Optimiser (Adam/AdamW), learning-rate schedule, step counts and device."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.0, 0.999)
    eps: float = 1e-9
    weight_decay: float = 0.0  # decoupled (AdamW)
    clip: float = 10.0  # gradient-norm clip; 0 disables
    schedule: str = "constant"  # constant | plateau
    lr_decay: float = 0.5  # factor applied on plateau
    lr_patience: int = 1  # validations without improvement before a decay
    max_steps: int = 1000
    max_time: str | None = None  # wall-clock budget of one session ("90m", "1h30m", "45s")
    eval_every: int = 200
    early_stop_patience: int = 0  # validations without improvement; 0 disables
    log_every: int = 20
    seed: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int | None = None  # CPU threads, fixed for the run; None: one per core (torch's)
    amp: bool = True  # mixed precision on CUDA; ignored elsewhere
    eval_max_tokens: int | None = None  # cap on validation tokens per check; None = all
    eval_temperature_tokens: int = 0  # >0: each validation searches the temperature on these
    l2: float = 0.0  # L2 penalty: loss += l2 * (sum of squares of the trainable parameters)
    average_after_bad_evals: int = 0  # average weights after N non-improving validations; 0: off
    average_from_step: int = 0  # average weights from this step at the latest; 0: off
    accum_batch_size: int | None = None  # split each batch into sub-batches of this many streams
    nonfinite: str = "stop"  # on a NaN/inf training loss: stop | skip | rollback
    rollback_lr_factor: float = 0.5  # nonfinite=rollback: lr multiplied by this
    max_nonfinite: int = 5  # more non-finite losses than this between checkpoints: stop
    check_memory: bool = True  # refuse a model whose training cannot fit in memory (lm/budget.py)
    dist_timeout: float = 300.0  # torchrun: seconds a rank waits for a stalled or dead peer


@dataclass
class RunConfig:
    """Everything a run needs: a name, an output folder and the three sections.

    ``version`` is the schema version the config was written in; a loaded config is
    always upgraded to :data:`CONFIG_VERSION`.
    """

    version: int = CONFIG_VERSION
    name: str = "run"
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
