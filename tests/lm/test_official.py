"""Fidelity to the official Mogrifier code (deepmind/lamb): the paper presets against the
official trials, the loss/L2/clip conversion, the official initialisation, dropout masks,
the down-projected output dropout, the softmax temperature of a mixture, gradient
accumulation and the averaging triggers."""

from __future__ import annotations

import json
import math
import operator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from moglstm.lm import train as train_module
from moglstm.lm.config import (
    DataConfig,
    RunConfig,
    TrainConfig,
    current_key,
    from_dict,
    load_config,
    load_preset,
    model_config,
    to_dict,
    validate,
)
from moglstm.lm.distributed import DistContext
from moglstm.lm.evaluate import OFFICIAL_TEMPERATURES, score_split
from moglstm.lm.models import (
    RNNLanguageModel,
    build_model,
    count_parameters,
    softmax_temperature,
)
from moglstm.lm.regularize import l2_penalty
from moglstm.lm.runs.checkpoint import load_checkpoint
from moglstm.lm.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

# --------------------------------------------------------------------------- the official trials

# The official values, copied from lamb/experiment/mogrifier/config/<dir>/trial_<n>/config
# (keys: lamb's). Every preset below is converted from its row with `expected()`.
_COMMON = dict(  # the same in every trial
    cap_input_gate=True,
    forget_bias=1.0,
    lstm_skip_connection=True,
    shared_mask_dropout=False,
    downprojected_output_dropout=-1.0,
    drop_state_probability=0.01,
    embedding_init_factor=1.0,
    cell_init_factor=1.0,
    output_init_factor=1.0,
    max_grad_norm=10.0,
    rmsprop_beta2=0.999,
    rmsprop_epsilon=1e-08,
    early_stopping_turns=-1,
    learning_rate_decay=1.0,
    embedding_dropout=0.0,
    eval_softmax_temperature=-0.8,  # negative: searched, down to a multiplier of 0.8
    eval_softmax_temperature_estimation_num_tokens=50000,  # (lamb's default where absent)
    seed=1,
)
_WORD = dict(batch_size=64, accum_batch_size=-1, max_time_steps=70, steps_per_turn=200)
_WORD.update(turns=1000, trigger_averaging_turns=50, trigger_averaging_at_the_latest=800)
_WORD.update(print_training_stats_every_num_steps=200, num_layers=2)
_CHAR = dict(_WORD, max_time_steps=150, turns=500)
_CHAR.update(trigger_averaging_turns=25, trigger_averaging_at_the_latest=400)
_ENWIK8 = dict(batch_size=128, accum_batch_size=-1, max_time_steps=500, steps_per_turn=400)
_ENWIK8.update(turns=100, trigger_averaging_turns=10, trigger_averaging_at_the_latest=80)
_ENWIK8.update(print_training_stats_every_num_steps=1000, num_layers=4)
_NO_MOS = dict(share_input_and_output_embeddings=False, input_embedding_ratio=1.0)
_NO_MOS.update(mos_num_components=0)

OFFICIAL = {
    # preset: (trial, corpus, official values)
    "ptb-paper": ("786252db3825+_tune_ptb_24m_lstm_fm_d2_arms/trial_483", "ptb", dict(
        _WORD, num_params=24000000, feature_mask_rounds=5, feature_mask_rank=84,
        share_input_and_output_embeddings=True, input_embedding_ratio=1.0, mos_num_components=0,
        input_dropout=0.7290787773167251, inter_layer_dropout=0.2909822365241189,
        state_dropout=0.38729439899832296, output_dropout=0.7156690388448465,
        learning_rate=0.002299987130225388, l2_penalty=0.00025235335778471014)),
    "ptb-paper-lstm": ("786252db3825+_tune_ptb_24m_lstm_d2_arms/trial_833", "ptb", dict(
        _WORD, num_params=24000000, feature_mask_rounds=0, feature_mask_rank=0,
        share_input_and_output_embeddings=True, input_embedding_ratio=1.0, mos_num_components=0,
        input_dropout=0.6275626425150355, inter_layer_dropout=0.3069926535017156,
        state_dropout=0.3692225400980858, output_dropout=0.6901712653612706,
        learning_rate=0.0030369099569192135, l2_penalty=0.00024908138497223704)),
    "wt2-paper": ("c51c838b33a5+_tune_wikitext-2_35m_lstm_mos2_fm_d2_arms/trial_747", "wikitext-2",
        dict(_WORD, num_params=35000000, feature_mask_rounds=6, feature_mask_rank=48,
        share_input_and_output_embeddings=True, input_embedding_ratio=0.1993194960596213,
        mos_num_components=2,
        input_dropout=0.5469087645499495, inter_layer_dropout=0.1988228263748591,
        state_dropout=0.22137985867236876, output_dropout=0.34766651193735193,
        learning_rate=0.003287792100749033, l2_penalty=0.00018994987193751323)),
    "wt2-paper-lstm": ("c51c838b33a5+_tune_wikitext-2_35m_lstm_mos2_d2_arms/trial_763",
        "wikitext-2", dict(_WORD, num_params=35000000, feature_mask_rounds=0, feature_mask_rank=0,
        share_input_and_output_embeddings=True, input_embedding_ratio=0.3530770457779424,
        mos_num_components=2,
        input_dropout=0.6090979517941943, inter_layer_dropout=0.09075401405970591,
        state_dropout=0.2714030562283111, output_dropout=0.34845530389157287,
        learning_rate=0.003183909546336849, l2_penalty=0.00023063627783021125)),
    "ptb-char-paper": ("0393c7dc3532+_tune_ptb_char_24m_lstm_fm_d2_asgd_ts150/trial_596",
        "ptb-char", dict(_CHAR, **_NO_MOS, num_params=24000000, feature_mask_rounds=4,
        feature_mask_rank=24,
        input_dropout=0.27860252841733274, inter_layer_dropout=0.0737609984911853,
        state_dropout=0.17118611234551975, output_dropout=0.2347428361918374,
        learning_rate=0.003739598828019367, l2_penalty=0.00025558089199237096)),
    "enwik8-paper": ("4d0a9a5bdb04+_tune_enwik8_48m_lstm_fm_d4_arms/trial_234", "enwik8", dict(
        _ENWIK8, **_NO_MOS, num_params=48000000, feature_mask_rounds=6, feature_mask_rank=79,
        input_dropout=0.015496029112930465, inter_layer_dropout=0.008633961431527571,
        state_dropout=0.0437288219541186, output_dropout=0.138307173174503,
        learning_rate=0.001021423409385794, l2_penalty=0.000993383826740019)),
    "enwik8-paper-lstm": ("4d0a9a5bdb04+_tune_enwik8_48m_lstm_d4_arms/trial_400", "enwik8", dict(
        _ENWIK8, **_NO_MOS, num_params=48000000, feature_mask_rounds=0, feature_mask_rank=0,
        input_dropout=0.16279440026790548, inter_layer_dropout=0.11949666753873665,
        state_dropout=0.1036809388104279, output_dropout=0.13860156332143037,
        learning_rate=0.002516709293528533, l2_penalty=2.5181258956042348e-05)),
    "enwik8-96m-paper": ("e81db31261c0+_tune_enwik8_96m_lstm_fm_d4_arms_MtngW/trial_216",
        "enwik8", dict(_ENWIK8, **_NO_MOS, num_params=96000000, feature_mask_rounds=5,
        feature_mask_rank=61, accum_batch_size=64,
        input_dropout=0.015908852824256536, inter_layer_dropout=0.13785990907975867,
        state_dropout=0.1648727901535727, output_dropout=0.2878539844807166,
        learning_rate=0.0022480107672343715, l2_penalty=4.409390792135428e-05)),
    "enwik8-96m-paper-lstm": ("e81db31261c0+_tune_enwik8_96m_lstm_d4_arms/trial_295", "enwik8",
        dict(_ENWIK8, **_NO_MOS, num_params=96000000, feature_mask_rounds=0, feature_mask_rank=0,
        accum_batch_size=64,
        input_dropout=0.1233672355450206, inter_layer_dropout=0.12636500626697247,
        state_dropout=0.13063181510547955, output_dropout=0.24846692818769148,
        learning_rate=0.001975213597736287, l2_penalty=5.853555404849184e-05)),
}  # fmt: skip
# No official LSTM trial exists for PTB characters: its twin takes the Mogrifier's row.
OFFICIAL["ptb-char-paper-lstm"] = (
    OFFICIAL["ptb-char-paper"][0],
    "ptb-char",
    dict(OFFICIAL["ptb-char-paper"][2], feature_mask_rounds=0, feature_mask_rank=0),
)


def expected(corpus: str, official: dict) -> dict[str, object]:
    """The settings of this toolkit that the official row converts to (docs/reproduce.md)."""
    o = dict(_COMMON, **official)
    steps = o["max_time_steps"]  # the official loss sums over the window's time steps ...
    parts = 1 if o["accum_batch_size"] < 0 else o["batch_size"] // o["accum_batch_size"]
    turn = o["steps_per_turn"]
    mos = o["mos_num_components"] > 1
    downprojected = o["downprojected_output_dropout"]
    downprojected = o["output_dropout"] if downprojected < 0 else downprojected
    return {
        "data.corpus": corpus,
        "data.batch_size": o["batch_size"],
        "data.bptt": steps,
        "data.eval_batch_size": o["batch_size"] if parts == 1 else o["accum_batch_size"],
        "model.kind": "mogrifier",  # rounds 0 is the official LSTM cell (state dropout, cap)
        "model.num_params": f"{o['num_params'] // 1_000_000}M",
        "model.num_layers": o["num_layers"],
        "model.mogrify_rounds": o["feature_mask_rounds"],
        "model.mogrify_rank": o["feature_mask_rank"] or None if o["feature_mask_rounds"] else None,
        "model.tie_weights": o["share_input_and_output_embeddings"],
        "model.embedding_ratio": (
            None if o["input_embedding_ratio"] == 1.0 else o["input_embedding_ratio"]
        ),
        "model.embedding_size": None,
        "model.mos_components": max(1, o["mos_num_components"]),
        "model.mos_dropout": downprojected if mos else 0.0,
        "model.projection_dropout": 0.0,  # no trial has a projection without a mixture
        "model.embedding_dropout": o["embedding_dropout"],
        "model.input_dropout": o["input_dropout"],
        "model.layer_dropout": o["inter_layer_dropout"],
        "model.state_dropout": o["state_dropout"],
        "model.output_dropout": o["output_dropout"],
        "model.dropout_mask": "window" if o["shared_mask_dropout"] else "step",
        "model.state_dropout_mask": "window",  # the official state mask is always shared
        "model.drop_state_probability": o["drop_state_probability"],
        "model.cap_input_gate": o["cap_input_gate"],
        "model.coupled": False,
        "model.peephole": False,
        "model.sum_layer_outputs": o["lstm_skip_connection"],
        "model.forget_bias": o["forget_bias"],
        "model.init": "official",
        "model.embedding_init_factor": o["embedding_init_factor"],
        "model.cell_init_factor": o["cell_init_factor"],
        "model.output_init_factor": o["output_init_factor"],
        "train.lr": o["learning_rate"],
        "train.betas": (0.0, o["rmsprop_beta2"]),  # lamb's "rmsprop" is Adam with beta1 = 0
        "train.weight_decay": 0.0,
        # ... and sums the gradients of `parts` sub-batches: both scale the gradient
        "train.clip": o["max_grad_norm"] / (steps * parts),
        "train.eps": o["rmsprop_epsilon"] / (steps * parts),
        "train.l2": o["l2_penalty"] / (2 * steps),  # tf.nn.l2_loss is sum(w**2) / 2
        "train.accum_batch_size": None if parts == 1 else o["accum_batch_size"],
        "train.schedule": "constant" if o["learning_rate_decay"] == 1.0 else "?",
        "train.max_steps": o["turns"] * turn,
        "train.eval_every": turn,
        "train.eval_temperature_tokens": (
            o["eval_softmax_temperature_estimation_num_tokens"]
            if o["eval_softmax_temperature"] < 0
            else 0
        ),
        "train.eval_max_tokens": None,
        "train.log_every": o["print_training_stats_every_num_steps"],
        "train.average_after_bad_evals": o["trigger_averaging_turns"],
        "train.average_from_step": o["trigger_averaging_at_the_latest"] * turn + 1,
        "train.early_stop_patience": max(0, o["early_stopping_turns"]),
        "train.seed": o["seed"],
    }


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_each_paper_preset_holds_its_official_trial(name):
    trial, corpus, official = OFFICIAL[name]
    cfg = load_preset(name)
    path = Path(__file__).parents[2] / "src/moglstm/lm/presets" / f"{name}.yaml"
    assert trial in path.read_text()  # the preset names its trial
    for key, want in expected(corpus, official).items():  # keys of config version 1
        got = operator.attrgetter(current_key(key))(cfg)
        if isinstance(want, float) and isinstance(got, float):
            assert math.isclose(got, want, rel_tol=1e-3), (key, got, want)
        else:
            assert got == want, (key, got, want)


# --------------------------------------------------------------------------- L2 and clipping


def _tiny_model(**kwargs) -> RNNLanguageModel:
    args = dict(hidden_size=10, num_layers=2, mogrify_rounds=3, mogrify_rank=2)
    args.update(cap_input_gate=True, forget_bias=1.0, init="official", implementation="reference")
    args.update(kwargs)
    torch.manual_seed(3)
    return RNNLanguageModel(17, model_config(**args)).double().eval()


def test_the_official_objective_is_t_times_ours_with_l2_over_2t_so_clip_divides_by_t():
    model = _tiny_model(mos_components=2, embedding_size=6)  # tied, mixture: every kind
    steps, batch, l2 = 9, 4, 2.5e-3
    x = torch.randint(17, (steps, batch), generator=torch.Generator().manual_seed(1))
    y = torch.randint(17, (steps, batch), generator=torch.Generator().manual_seed(2))
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(objective) -> list[torch.Tensor]:
        logits, _ = model(x)
        return torch.autograd.grad(objective(logits), params)

    def official(logits):  # lamb/lm.py: xe summed over time, averaged over the batch
        xe = F.cross_entropy(logits.reshape(-1, 17), y.reshape(-1), reduction="none")
        l2_loss = sum(p.square().sum() / 2 for p in params)
        return xe.view(steps, batch).sum(0).mean() + l2 * l2_loss  # tf.nn.l2_loss: sum / 2

    def ours(logits):  # per-token mean plus train.l2 = l2_penalty / (2 T)
        xe = F.cross_entropy(logits.reshape(-1, 17), y.reshape(-1))
        return xe + l2_penalty(model, l2 / (2 * steps))

    theirs, mine = grads(official), grads(ours)
    for a, b in zip(theirs, mine, strict=True):
        # equal up to float32 rounding (the mixture normalises in float32, as does l2_penalty)
        assert (a - steps * b).abs().max() <= 1e-5 * a.abs().max()
    # the official L2 covers every trainable variable: ours penalises each parameter too
    penalty_grads = torch.autograd.grad(l2_penalty(model, 1.0), params)
    assert all(torch.allclose(g, 2 * p) for g, p in zip(penalty_grads, params, strict=True))
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {
        f"layers.{i}.bias_hh_l0" for i in range(2)  # zero and frozen (official init)
    }
    # clipping the official gradient at c clips ours at c / T: the same update direction
    norm = torch.cat([g.flatten() for g in theirs]).norm()
    clip = float(norm) / 3
    scale_theirs, scale_mine = clip / norm, (clip / steps) / (norm / steps)
    assert math.isclose(float(scale_theirs), float(scale_mine), rel_tol=1e-12)
    # with the old conversion (l2 / T) the penalty's share of the gradient would double
    old = torch.autograd.grad(l2_penalty(model, l2 / steps), params)
    new = torch.autograd.grad(l2_penalty(model, l2 / (2 * steps)), params)
    assert all(torch.allclose(o, 2 * n) for o, n in zip(old, new, strict=True))


# --------------------------------------------------------------------------- initialisation


def _draw_std(std_untruncated: float) -> float:
    return std_untruncated * 0.87962566103423978  # a normal truncated at two deviations


def test_official_init_draws_lambs_truncated_normals():
    h, e, vocab = 64, 48, 300
    torch.manual_seed(0)
    m = RNNLanguageModel(vocab, model_config(
        hidden_size=h, embedding_size=e, num_layers=2, mogrify_rounds=4, mogrify_rank=8,
        tie_weights=False, init="official", forget_bias=1.0, embedding_init_factor=2.0,
        cell_init_factor=0.5, output_init_factor=3.0, implementation="reference",
    ))  # fmt: skip

    def check(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        d = t.detach().double() - mean
        assert d.abs().max() <= 2 * std + 1e-6  # truncated at two deviations
        assert math.isclose(d.std().item(), _draw_std(std), rel_tol=0.1), (t.shape, std)

    check(m.embedding.weight, math.sqrt(2.0 / e) / 0.87962566103423978)  # fan-out, TF's scale
    check(m.decoder.weight, math.sqrt(3.0 / h) / 0.87962566103423978)  # fan-in
    assert torch.equal(m.decoder.bias, torch.zeros(vocab))
    for i, layer in enumerate(m.layers):
        fan_in = e if i == 0 else h
        check(layer.weight_ih_l0, math.sqrt(1.3 * 0.5 / fan_in))  # lamb.utils' 1.3
        check(layer.weight_hh_l0, math.sqrt(1.3 * 0.5 / h))
        bias = layer.bias_ih_l0.detach()
        forget = bias[h : 2 * h]  # gates i, f, g, o
        check(forget, math.sqrt(1.3 * 0.5 / h), mean=1.0)
        check(torch.cat([bias[:h], bias[2 * h :]]), math.sqrt(1.3 * 0.5 / h))
        assert torch.equal(layer.bias_hh_l0, torch.zeros(4 * h))
        assert not layer.bias_hh_l0.requires_grad  # one bias per gate, as the official cell
        mog = layer.mogrifier_l0
        for r in range(1, 5):
            _, round_in = mog.round_shape(r)
            std = (round_in * 8) ** -0.25  # lamb's low-rank factors, unscaled
            check(getattr(mog, f"weight_{r}_left"), std)
            check(getattr(mog, f"weight_{r}_right"), std)
            assert not getattr(mog, f"bias_{r}").any()
    # the frozen bias is neither trained nor penalised nor counted in the budget
    assert count_parameters(m) - count_parameters(m, trainable_only=True) == 2 * 4 * h


def test_official_init_full_rank_rounds_mixture_and_projection():
    torch.manual_seed(0)
    full = RNNLanguageModel(50, model_config(hidden_size=40, mogrify_rounds=2, init="official"))
    w = full.layers[0].mogrifier_l0.weight_1  # (I, H): fan-in H
    assert math.isclose(w.std().item(), _draw_std(math.sqrt(1.3 / 40)), rel_tol=0.1)
    mos = RNNLanguageModel(
        50, model_config(hidden_size=40, embedding_size=20, mos_components=3, init="official")
    )
    for p in (mos.mos.latent.weight, mos.mos.prior.weight):
        assert math.isclose(p.std().item(), math.sqrt(1 / 40), rel_tol=0.15)
    assert torch.equal(mos.mos.latent.bias, torch.zeros_like(mos.mos.latent.bias))
    tied = RNNLanguageModel(50, model_config(hidden_size=40, embedding_size=20, init="official"))
    p = tied.projection.weight  # (E, H): orthogonal rows
    assert torch.allclose(p @ p.T, torch.eye(20), atol=1e-5)
    assert tied.decoder.weight is tied.embedding.weight


def test_official_init_is_a_config_setting_and_checked():
    with pytest.raises(ValueError, match="model.init='official' is defined"):
        load_config(None, ["model.kind=gru", "model.init=official"])
    with pytest.raises(ValueError, match="model.init='sometimes'"):
        load_config(None, ["model.init=sometimes"])
    with pytest.raises(ValueError, match="cell_init_factor"):
        load_config(None, ["model.cell_init_factor=0"])
    cfg = load_config(None, ["model.init=official", "model.kind=lstm", "model.hidden_size=8"])
    assert cfg.model.init == "official"


# --------------------------------------------------------------------------- dropout masks


def _calls_per_window(monkeypatch, m: RNNLanguageModel) -> int:
    calls = []
    layer = m.layers[0]
    original = layer.forward
    monkeypatch.setattr(layer, "forward", lambda x, s=None: calls.append(1) or original(x, s))
    m.train()
    m(torch.randint(17, (6, 3)))
    return len(calls)


def test_step_masks_with_a_window_state_mask_is_the_official_mix(monkeypatch):
    # shared_mask_dropout=False: input/between-layer/output masks fresh at every step, the
    # state mask one per window: the layer runs whole (one call, one state mask)
    args = dict(input_dropout=0.5, state_dropout=0.5, dropout_mask="step")
    official = _tiny_model(**args, state_dropout_mask="window")
    assert official.input_drop.mask == "step" and official.output_drop.mask == "step"
    assert _calls_per_window(monkeypatch, official) == 1
    stepwise = _tiny_model(**args)  # state_dropout_mask None: follows dropout_mask (per step)
    assert stepwise.state_dropout_mask == "step"
    assert _calls_per_window(monkeypatch, stepwise) == 6
    with pytest.raises(ValueError, match="state_dropout_mask"):
        _tiny_model(state_dropout_mask="sometimes")


def test_projection_dropout_drops_the_down_projected_output_afresh_each_step():
    m = _tiny_model(embedding_size=6, projection_dropout=0.5, dropout_mask="step").float()
    seen = []
    m.decoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    m.train()
    m(torch.randint(17, (40, 3)))
    z = seen[-1]  # (T, B, E): the decoder's input
    zeros = (z == 0).float()
    assert 0.35 < zeros.mean().item() < 0.65
    assert not torch.equal(zeros[0], zeros[1])  # fresh per step
    m.eval()
    seen.clear()
    x = torch.randint(17, (5, 2))
    m(x)
    assert torch.equal(seen[-1], m.projection(m.output_drop(_last_output(m, x))))
    with pytest.raises(ValueError, match="projection_dropout"):
        _tiny_model(projection_dropout=0.5)  # no projection: embedding = hidden
    with pytest.raises(ValueError, match="model.output.mos_dropout"):
        load_config(None, ["model.projection_dropout=0.3", "model.mos_components=2"])


def _last_output(m: RNNLanguageModel, x: torch.Tensor) -> torch.Tensor:
    h = m.embedding(x)
    for layer in m.layers:
        h, _ = layer(h)
    return h


# --------------------------------------------------------------------------- temperature


def test_temperature_divides_each_mixture_components_logits_as_the_official_code():
    m = _tiny_model(mos_components=3, embedding_size=6)
    x = torch.randint(17, (5, 2))
    t = 0.8
    with softmax_temperature(m, t) as inside:
        tempered, _ = m(x)
    assert inside and m.temperature == 1.0  # restored
    # by hand: p(w) = sum_k pi_k softmax(z_k W^T / t + b / t)
    h = m.output_drop(_last_output(m, x))
    pi = F.log_softmax(m.mos.prior(h), -1)
    z = torch.tanh(m.mos.latent(h)).view(5, 2, 3, 6)
    log_p = F.log_softmax(m.decoder(z) / t, -1)
    want = torch.logsumexp(log_p + pi.unsqueeze(-1), 2)
    assert torch.allclose(tempered, want.float(), atol=1e-5)
    plain, _ = m(x)  # dividing the mixture's log-probabilities is a different thing
    assert not torch.allclose(tempered, F.log_softmax(plain / t, -1), atol=1e-4)
    # scoring under several temperatures takes one pass per temperature for a mixture
    data = torch.randint(17, (30, 2))
    losses, _ = score_split(m.float(), data, 7, temperatures=[1.0, t])
    (alone,), _ = score_split(m, data, 7)
    with softmax_temperature(m, t):
        (inside_t,), _ = score_split(m, data, 7)
    assert losses == pytest.approx([alone, inside_t], rel=1e-6)


def test_temperature_of_a_plain_softmax_divides_the_logits():
    m = _tiny_model(embedding_size=6)
    x = torch.randint(17, (5, 2))
    plain, _ = m(x)
    with softmax_temperature(m, 1.25):
        tempered, _ = m(x)
    assert torch.allclose(tempered, plain / 1.25)
    with pytest.raises(ValueError, match="positive"):
        with softmax_temperature(m, 0.0):
            pass


# --------------------------------------------------------------------------- accumulation


def _fake_run(model, accum, state=None) -> SimpleNamespace:
    cfg = SimpleNamespace(train=SimpleNamespace(accum_batch_size=accum))
    return SimpleNamespace(
        cfg=cfg, model=model, net=None, state=state, device=torch.device("cpu"),
        amp_dtype=None, scaler=None, dist=DistContext(device=torch.device("cpu")),
    )  # fmt: skip


@pytest.mark.parametrize("accum", [1, 2, 3])
def test_accumulated_gradients_equal_the_large_batch(accum):
    model = _tiny_model(state_dropout=0.0).float()
    model.train()  # no dropout configured: training mode is deterministic
    x = torch.randint(17, (8, 6), generator=torch.Generator().manual_seed(4))
    y = torch.randint(17, (8, 6), generator=torch.Generator().manual_seed(5))
    _, state = model(torch.randint(17, (4, 6)))
    state = train_module.detach_state(state)
    results = []
    for size in (None, accum):
        model.zero_grad(set_to_none=True)
        value, new_state = train_module._accumulate_gradients(_fake_run(model, size, state), x, y)
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((value, new_state, grads))
    (v1, s1, g1), (v2, s2, g2) = results
    assert math.isclose(v1, v2, rel_tol=1e-6)
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    for (h1, c1), (h2, c2) in zip(s1, s2, strict=True):  # the state carries on the same
        assert torch.allclose(h1, h2, atol=1e-6) and torch.allclose(c1, c2, atol=1e-6)


def _run(data: DataConfig, out_dir: Path, name: str, **train_kw) -> RunConfig:
    model = model_config(hidden_size=12, num_layers=2, mogrify_rounds=2, init="official")
    model.implementation = "reference"
    settings = dict(lr=0.01, max_steps=4, eval_every=2, log_every=2, seed=5, device="cpu")
    settings.update(eval_max_tokens=100, **train_kw)
    data = DataConfig(**{**data.__dict__, "batch_size": 4})
    return RunConfig(
        name=name, out_dir=str(out_dir), data=data, model=model, train=TrainConfig(**settings)
    )


def test_training_with_accumulation_ends_like_training_on_the_large_batch(
    word_data_config, tmp_path
):
    big = train(_run(word_data_config, tmp_path, "big", l2=1e-3), quiet=True)
    small_cfg = _run(word_data_config, tmp_path, "small", l2=1e-3, accum_batch_size=2)
    small = train(small_cfg, quiet=True)
    a = load_checkpoint(Path(big["run_dir"]) / "last.pt")["model"]
    b = load_checkpoint(Path(small["run_dir"]) / "last.pt")["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


def test_accum_batch_size_must_divide_the_batch():
    with pytest.raises(ValueError, match="train.accum_batch_size=3 must be a positive divisor"):
        load_config(None, ["data.batch_size=8", "train.accum_batch_size=3"])
    assert load_config(None, ["data.batch_size=8", "train.accum_batch_size=4"])


# --------------------------------------------------------------------------- turns


def test_averaging_at_the_latest_turn_starts_with_the_turns_first_step(
    word_data_config, tmp_path, monkeypatch
):
    # official: at the start of turn L (after its validation) averaging is triggered, and
    # the first sample is the weights after the next step: average_from_step = L * turn + 1
    turn, latest = 2, 1
    cfg = _run(word_data_config, tmp_path, "turns", max_steps=3 * turn)
    cfg.train.average_from_step = latest * turn + 1
    result = train(cfg, quiet=True)
    ckpt = load_checkpoint(Path(result["run_dir"]) / "last.pt")
    assert ckpt["averaging"] == {"count": 3 * turn - latest * turn}  # steps 3..6
    valid = [r for r in _records(result) if r["split"] == "valid"]
    # validation of turn 1 (step 2) scores raw weights; turn 2 (step 4) the mean of 2 samples
    assert [r.get("averaged_steps") for r in valid] == [None, turn, 2 * turn]


# --------------------------------------------------------------------------- compatibility


def test_configs_and_weights_of_the_previous_release_still_load():
    new_keys = {
        "model": ["state_dropout_mask", "projection_dropout", "init", "embedding_init_factor",
                  "cell_init_factor", "output_init_factor"],
        "train": ["accum_batch_size"],
    }  # fmt: skip
    model_cfg = model_config(hidden_size=8, dropout_mask="step", state_dropout=0.1)
    old = to_dict(RunConfig(model=model_cfg))
    del old["version"]  # written before config versioning: version 1, flat model keys
    old["model"] = {**old["model"], **old["model"].pop("output")}
    for section, keys in new_keys.items():
        for key in keys:
            del old[section][key]
    cfg = validate(from_dict(old))  # a checkpoint's config without the new keys
    assert cfg.model.init == "default" and cfg.train.accum_batch_size is None
    model = build_model(cfg.model, 30)
    assert model.state_dropout_mask == "step"  # state dropout per step, as before
    torch.manual_seed(0)
    before = build_model(cfg.model, 30).state_dict()  # the same names and shapes as before
    model.load_state_dict(before)
    assert all(p.requires_grad for p in model.parameters())


def test_validation_searches_the_temperature_as_the_official_code(
    word_data_config, tmp_path, monkeypatch
):
    calls = []
    original = train_module.score_split

    def spy(model, data, bptt, **kwargs):
        calls.append((tuple(kwargs["temperatures"]), kwargs["max_tokens"]))
        return original(model, data, bptt, **kwargs)

    monkeypatch.setattr(train_module, "score_split", spy)
    cfg = _run(word_data_config, tmp_path, "temperature", eval_temperature_tokens=60)
    result = train(cfg, quiet=True)
    valid = [r for r in _records(result) if r["split"] == "valid"]
    assert len(valid) == 2 and all(r["temperature"] in OFFICIAL_TEMPERATURES for r in valid)
    searches = [c for c in calls if len(c[0]) > 1]
    assert searches == [(OFFICIAL_TEMPERATURES, 60)] * 2  # before each validation
    assert min(OFFICIAL_TEMPERATURES) == pytest.approx(1 / 1.06)
    assert max(OFFICIAL_TEMPERATURES) == pytest.approx(1 / 0.8)
    plain = train(_run(word_data_config, tmp_path, "plain"), quiet=True)
    assert all("temperature" not in r for r in _records(plain))


def _records(result: dict) -> list[dict]:
    lines = (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
