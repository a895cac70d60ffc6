"""DPO-family training through trl: the loss is the SPIN/DPO formula of methods.md,
and the reference of iteration t+1 is exactly the policy at the end of iteration t."""

from __future__ import annotations

import math

import pytest
import torch

from harness.config.experiment import SftSection, parse
from full_forward import sequence_logprobs
from harness.models.load import load_policy
from harness.train import (dpo_trainer, lora_config, only_adapter_dropout, precompute_reference, reference_logps,
                           train_dpo, trainer_args)

PAIRS = [{"messages": [{"role": "user", "content": f"what is {i} plus {i + 1}"}],
          "chosen": f"{2 * i + 1}", "rejected": "no no"} for i in range(8)]


def make_cfg(model_dir, out, **over):
    doc = {"experiment": {"name": "t", "output_dir": str(out)},
           "model": {"base": str(model_dir), "device": "cpu"},
           "method": {"name": "spin", "iterations": 2, "beta": 0.5},
           "data": {"train": "unused.jsonl"},
           "lora": {"r": 4, "alpha": 8},
           "training": {"batch_size": 4, "learning_rate": 5e-3, "max_length": 64, "warmup_ratio": 0.0}}
    for section, values in over.items():
        doc.setdefault(section, {}).update(values)
    return parse(doc)


def _trainer(model, tok, cfg, pairs, peft_config, **extra):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_list([{"prompt": p["messages"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    args = trainer_args(DPOConfig, cfg, cfg.run_dir, 1, beta=cfg.method.beta, loss_type=[cfg.method.loss],
                        **extra)
    return DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config)


def _batch(trainer, n):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


REF_C = torch.tensor([-20.0, -31.5, -12.25, -40.0])  # hand-chosen reference log-probs of four pairs
REF_R = torch.tensor([-25.0, -18.0, -30.5, -41.0])


def _loss_on_fixed_reference(cfg, pairs):
    """(trl's loss on the four ``pairs`` with reference log-probs REF_C / REF_R, the policy's
    chosen and rejected log-probs by a full forward): the policy is the base with a fresh
    adapter made non-zero, so policy != base."""
    model, tok = load_policy(cfg, [])
    trainer = _trainer(model, tok, cfg, pairs, lora_config(cfg.lora))
    torch.manual_seed(0)
    for name, p in trainer.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    batch = _batch(trainer, 4)
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = REF_C, REF_R
    trainer.precompute_ref_logps = True
    trainer.model.eval()
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch).item()
    msgs = [p["messages"] for p in pairs]
    return (got, sequence_logprobs(trainer.model, tok, msgs, [p["chosen"] for p in pairs]),
            sequence_logprobs(trainer.model, tok, msgs, [p["rejected"] for p in pairs]))


@pytest.mark.parametrize("loss", ["sigmoid", "hinge"])
def test_trl_loss_equals_spin_formula(tiny_dir, tmp_path, loss):
    """L = mean l(lam*log(p(y)/p_t(y)) - lam*log(p(y')/p_t(y'))), logistic or hinge,
    on hand-chosen reference log-probs and policy log-probs computed independently."""
    cfg = make_cfg(tiny_dir, tmp_path, method={"loss": loss})
    got, pc, pr = _loss_on_fixed_reference(cfg, PAIRS[:4])
    lam = cfg.method.beta
    ts = [lam * ((pc[i] - REF_C[i].item()) - (pr[i] - REF_R[i].item())) for i in range(4)]
    ell = (lambda t: math.log1p(math.exp(-t))) if loss == "sigmoid" else (lambda t: max(0.0, 1.0 - t))
    want = sum(ell(t) for t in ts) / 4
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert len({round(t, 3) for t in ts}) > 1  # the case is not degenerate


def test_trl_ipo_loss_equals_its_formula(tiny_dir, tmp_path):
    """loss = "ipo": trl's loss is IPO's (Eq. 17, tau = beta) on log-ratios averaged over each
    answer's tokens (trl's normalisation, confirmed there with IPO's authors):
    mean((d_c / n_c - d_r / n_r - 1 / (2 beta))^2), d = log p - log p_ref, n = answer tokens."""
    from harness.engines.generate import completion_ids

    cfg = make_cfg(tiny_dir, tmp_path, method={"loss": "ipo"})
    pairs = [{**p, "rejected": "no " * (i + 1)} for i, p in enumerate(PAIRS[:4])]  # answers of other lengths
    got, pc, pr = _loss_on_fixed_reference(cfg, pairs)
    tok = load_policy(cfg, [])[1]
    nc = [len(completion_ids(tok, p["messages"], p["chosen"])[1]) for p in pairs]
    nr = [len(completion_ids(tok, p["messages"], p["rejected"])[1]) for p in pairs]
    tau = cfg.method.beta
    terms = [((pc[i] - REF_C[i].item()) / nc[i] - (pr[i] - REF_R[i].item()) / nr[i] - 1 / (2 * tau)) ** 2
             for i in range(4)]
    assert got == pytest.approx(sum(terms) / 4, rel=1e-4, abs=1e-5)
    assert len(set(nr)) > 1 and len({round(t, 3) for t in terms}) > 1  # the case is not degenerate


def test_spin_at_its_optimum_has_no_gradient(tiny_dir, tmp_path):
    """methods.md's theory check: when the model equals the data (its answers are the human
    ones: y' = y), SPIN's loss has no gradient; with other answers it has one."""
    cfg = make_cfg(tiny_dir, tmp_path)

    def grad_norm(pairs):
        model, tok = load_policy(cfg, [])
        trainer = _trainer(model, tok, cfg, pairs, lora_config(cfg.lora))
        torch.manual_seed(0)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.2)  # the policy is not the reference
        batch = _batch(trainer, 4)
        trainer.model.eval()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        return math.sqrt(sum(float(p.grad.pow(2).sum()) for n, p in trainer.model.named_parameters()
                             if p.grad is not None)), loss.item()

    at_optimum, loss = grad_norm([{**p, "rejected": p["chosen"]} for p in PAIRS[:4]])
    away, _ = grad_norm(PAIRS[:4])
    assert loss == pytest.approx(math.log(2), abs=1e-6)
    assert away > 1e-2 and at_optimum < 1e-4 * away, (at_optimum, away)  # zero up to float rounding


def _reference_of_next_iteration(cfg, tmp_path, reference=None):
    """Train iteration 1, then build iteration 2's trainer the way the loop does (the
    harness's own ``dpo_trainer``, with ``reference`` as the loop passes it) and return
    (base log-probs before training, policy log-probs at the end of iteration 1,
    trl's reference log-probs in iteration 2), on the chosen answers of 4 pairs."""
    model, tok = load_policy(cfg, [])
    msgs = [p["messages"] for p in PAIRS[:4]]
    base_c = sequence_logprobs(model, tok, msgs, [p["chosen"] for p in PAIRS[:4]])
    _, trained = train_dpo(model, tok, PAIRS, cfg, 1, tmp_path / "it1")
    trained.eval()
    end_c = sequence_logprobs(trained, tok, msgs, [p["chosen"] for p in PAIRS[:4]])
    del trained, model
    model2, tok2 = load_policy(cfg, [tmp_path / "it1" / "adapter"])
    trainer = dpo_trainer(model2, tok2, PAIRS[:4], cfg, 2, tmp_path / "it2", reference=reference)
    ref_c, _ = reference_logps(trainer, 4)
    return base_c, end_c, ref_c


def _assert_reference_is_end_of_previous(base, end, ref, tol):
    """trl's reference equals the end-of-iteration policy to ``tol``, and training moved the
    log-probs by far more than ``tol``, so a wrong reference (e.g. the base model) cannot pass.

    ``tol``: the reference and the end-of-iteration log-probs come from different forward
    passes (trl's batch, with its padding, vs sequence_logprobs' batch; a model reloaded
    from the saved adapter), so they agree only to float rounding -- summed over the
    answer's tokens -- not bit for bit."""
    assert ref == pytest.approx(end, abs=tol)
    moved = max(abs(a - b) for a, b in zip(end, base))
    assert moved > 20 * tol, f"training moved the log-probs by only {moved:.3g}: the test cannot tell ref from base"
    assert max(abs(a - b) for a, b in zip(ref, base)) > 20 * tol


def _assert_reference_is_base(base, end, ref, tol):
    """method.reference = "base": trl's reference in iteration 2 equals the model before
    iteration 1 trained, and training moved the log-probs far beyond ``tol``, so the
    previous iterate (the default reference) cannot pass."""
    assert ref == pytest.approx(base, abs=tol)
    assert max(abs(a - b) for a, b in zip(end, base)) > 20 * tol
    assert max(abs(a - b) for a, b in zip(ref, end)) > 20 * tol


def test_reference_is_previous_iterate_lora_merge(tiny_dir, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path)
    assert cfg.chain == "merge"
    _assert_reference_is_end_of_previous(*_reference_of_next_iteration(cfg, tmp_path), tol=1e-3)


def test_reference_is_previous_iterate_lora_continue(tiny_dir, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path, lora={"chain": "continue"})
    _assert_reference_is_end_of_previous(*_reference_of_next_iteration(cfg, tmp_path), tol=1e-3)


@pytest.mark.parametrize("chain", ["merge", "continue"])
def test_reference_base_is_the_starting_model(tiny_dir, tmp_path, chain):
    cfg = make_cfg(tiny_dir, tmp_path, lora={"chain": chain}, method={"reference": "base"})
    # the loop passes the iteration-0 chain of adapters: none here (no M1 stage)
    _assert_reference_is_base(*_reference_of_next_iteration(cfg, tmp_path, reference=[]), tol=1e-3)


def test_reference_base_with_a_starting_adapter_continue_chain(tiny_dir, tmp_path):
    """Continue chain whose iteration 0 already has an adapter (Self-Rewarding's M1): the
    "base" reference of iteration 2 is that adapter, not the end of iteration 1."""
    cfg = make_cfg(tiny_dir, tmp_path, lora={"chain": "continue"}, method={"reference": "base"})
    model, tok = load_policy(cfg, [])
    _, start = train_dpo(model, tok, PAIRS[4:], cfg, 1, tmp_path / "m1")   # stands in for the M1 adapter
    start.eval()
    msgs, chosen = [p["messages"] for p in PAIRS[:4]], [p["chosen"] for p in PAIRS[:4]]
    start_c = sequence_logprobs(start, tok, msgs, chosen)
    del start, model
    model, tok = load_policy(cfg, [tmp_path / "m1" / "adapter"])
    _, trained = train_dpo(model, tok, PAIRS, cfg, 1, tmp_path / "it1", reference=[tmp_path / "m1" / "adapter"])
    trained.eval()
    end_c = sequence_logprobs(trained, tok, msgs, chosen)
    del trained, model
    model2, tok2 = load_policy(cfg, [tmp_path / "it1" / "adapter"])
    trainer = dpo_trainer(model2, tok2, PAIRS[:4], cfg, 2, tmp_path / "it2", reference=[tmp_path / "m1" / "adapter"])
    ref_c, _ = reference_logps(trainer, 4)
    _assert_reference_is_base(start_c, end_c, ref_c, tol=1e-3)
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if ".ref." in n)


def test_lora_dropout_is_honoured_and_nothing_else_drops_out(tiny_dir, tmp_path):
    """trl's default (disable_dropout) would set lora.dropout to 0 silently. The trained
    adapter drops out at the configured rate; the frozen reference does not, so its
    log-probs stay deterministic in train mode."""
    cfg = make_cfg(tiny_dir, tmp_path, lora={"dropout": 0.5, "chain": "continue"})
    model, tok = load_policy(cfg, [])
    train_dpo(model, tok, PAIRS, cfg, 1, tmp_path / "it1")
    model2, tok2 = load_policy(cfg, [tmp_path / "it1" / "adapter"])
    trainer = dpo_trainer(model2, tok2, PAIRS[:4], cfg, 2, tmp_path / "it2")
    drops = {n: m.p for n, m in trainer.model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert drops and {p for n, p in drops.items() if n.endswith("lora_dropout.default")} == {0.5}
    assert {p for n, p in drops.items() if not n.endswith("lora_dropout.default")} == {0.0}
    assert any(n.endswith("lora_dropout.ref") for n in drops)
    trainer.model.train()
    batch = _batch(trainer, 4)
    torch.manual_seed(0)
    a = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    b = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.equal(a, b)   # the adapter's dropout is active while training
    with torch.no_grad():
        r1, _ = trainer.compute_ref_log_probs(trainer.model, batch)
        r2, _ = trainer.compute_ref_log_probs(trainer.model, batch)
    assert torch.equal(r1, r2)     # the reference does not drop out
    trainer.model.eval()
    with torch.no_grad():
        c = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        d = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(c, d)


def test_only_adapter_dropout_turns_off_the_base_models_own_dropout():
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, attention_dropout=0.3))
    model.extra = torch.nn.Dropout(0.2)   # a model's own dropout module
    peft = get_peft_model(model, lora_config(make_cfg("m", "o", lora={"dropout": 0.1, "target_modules": ["q_proj"]}).lora))
    only_adapter_dropout(peft, 0.1)
    assert peft.base_model.model.extra.p == 0.0
    assert all(m.attention_dropout == 0.0 for m in peft.modules() if hasattr(m, "attention_dropout"))
    assert [m.p for n, m in peft.named_modules() if n.endswith("lora_dropout.default")] == [0.1]


def test_sft_has_its_own_settings(tiny_dir, tmp_path):
    from trl import SFTConfig

    cfg = make_cfg(tiny_dir, tmp_path, training={"learning_rates": [1e-6, 2e-6]})
    sft = SftSection(learning_rate=3e-4, epochs=2.0, batch_size=2, gradient_accumulation_steps=3, max_length=99)
    args = trainer_args(SFTConfig, cfg, tmp_path, 0, sft)
    assert (args.learning_rate, args.num_train_epochs, args.per_device_train_batch_size,
            args.gradient_accumulation_steps, args.max_length) == (3e-4, 2.0, 2, 3, 99)
    # the DPO iterations keep theirs; iteration 0 is not a DPO iteration (it used to get the last rate)
    assert cfg.learning_rate_for(1) == 1e-6 and cfg.learning_rate_for(2) == 2e-6 and cfg.learning_rate_for(3) == 2e-6
    with pytest.raises(ValueError, match="count from 1"):
        cfg.learning_rate_for(0)


@pytest.fixture(scope="module")
def qlora_dir(tmp_path_factory):
    """A tiny Llama that bitsandbytes can quantize on every CPU.

    On CPUs with AVX-512 BF16, bitsandbytes repacks 4-bit weights for its CPU kernel
    in eval mode: absmax blocks of 64 input features (the 4-bit blocksize) and tiles of
    32 output rows. A Linear with fewer than 64 inputs (the shared tiny model's hidden
    size 32) fails there with "shape '[32, 0]' is invalid". Here every dimension a
    quantized Linear sees is a multiple of 64: hidden 64, intermediate 128, 4 heads of
    64 / 4 = 16 with 4 key/value heads (q/k/v/o are 64 x 64); the vocabulary (embedding
    and tied lm_head, which stay unquantized) is padded to 384. The default initializer
    range keeps the logits small, so the 4-bit kernels' bf16 rounding stays far below
    what one iteration of training moves."""
    from test_eval_fixtures import build_tokenizer, tiny_llama_config
    from transformers import LlamaForCausalLM

    tok = build_tokenizer(["the quick brown fox jumps over the lazy dog 0123456789 question answer yes no "
                           "user assistant what is plus minus say"] * 10)
    cfg = tiny_llama_config(tok, vocab_size=384, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=4, tie_word_embeddings=True)
    assert len(tok) <= cfg.vocab_size
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            assert mod.in_features % 64 == 0 and mod.out_features % 64 == 0, (name, mod)
    out = tmp_path_factory.mktemp("qlora_model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_reference_is_previous_iterate_qlora(qlora_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = make_cfg(qlora_dir, tmp_path, model={"quantization": "4bit"}, training={"learning_rate": 2e-2})
    assert cfg.chain == "continue"
    # 4-bit base: the CPU and GPU 4-bit kernels compute in bf16 (about 3 significant digits),
    # so reference and end-of-iteration log-probs (sums over the answer's tokens, ~-55 here)
    # agree to ~1e-3, not to float32 precision; training moves them by ~1
    _assert_reference_is_end_of_previous(*_reference_of_next_iteration(cfg, tmp_path), tol=2e-2)


def test_reference_base_qlora(qlora_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = make_cfg(qlora_dir, tmp_path, model={"quantization": "4bit"}, training={"learning_rate": 2e-2},
                   method={"reference": "base"})
    _assert_reference_is_base(*_reference_of_next_iteration(cfg, tmp_path, reference=[]), tol=2e-2)


def test_qlora_gradients_survive_an_eval_forward(qlora_dir):
    """A QLoRA policy that has generated (an eval-mode forward without gradients) must train
    with the same gradients as one that has not. On CPUs with AVX-512 BF16, bitsandbytes would
    otherwise switch its 4-bit layers to a kernel without a backward pass after that forward,
    and the adapters of the lower layers would get wrong gradients (on other CPUs both
    models take the same path and this checks only that loading is deterministic)."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    from harness.models.load import load_model

    ids = torch.tensor([[5, 9, 14, 22, 31, 7, 12, 40]])

    def lora_grads(eval_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = load_model(str(qlora_dir), quantization="4bit", device="cpu")
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0, init_lora_weights=False))
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    fresh, after_eval = lora_grads(False), lora_grads(True)
    lowest = [n for n in fresh if ".layers.0." in n]
    assert lowest and all(fresh[n] is not None and fresh[n].abs().sum() > 0 for n in lowest)
    no_gradient = [n for n, g in after_eval.items() if g is None]
    assert not no_gradient, f"no gradient reached {no_gradient}"
    for name in fresh:
        torch.testing.assert_close(after_eval[name], fresh[name], rtol=1e-3, atol=1e-6, msg=name)


def test_merge_chain_rejected_for_quantized_base(tiny_dir, tmp_path):
    from harness.config.schema import ConfigError

    with pytest.raises(ConfigError, match="lora.chain"):
        make_cfg(tiny_dir, tmp_path, model={"quantization": "4bit"}, lora={"chain": "merge"})


def _iteration_two(cfg, tmp_path, reference):
    """(model_2, tokenizer) after one trained iteration, as the loop loads them."""
    model, tok = load_policy(cfg, [])
    train_dpo(model, tok, PAIRS, cfg, 1, tmp_path / "it1")
    return load_policy(cfg, [tmp_path / "it1" / "adapter"])


@pytest.mark.parametrize("chain,reference", [("merge", None), ("continue", None), ("merge", []), ("continue", [])])
def test_precomputed_reference_is_trls_reference(tiny_dir, tmp_path, chain, reference):
    """The reference log-probs computed once per iteration are the ones trl's per-step path
    computes (same reference -- previous iterate, or the base for reference = "base" -- in
    other batches, so equal to float rounding), and trl's loss then reads them."""
    cfg = make_cfg(tiny_dir, tmp_path, lora={"chain": chain},
                   method={"reference": "base" if reference is not None else "previous"})
    model, tok = _iteration_two(cfg, tmp_path, reference)
    trainer = dpo_trainer(model, tok, PAIRS, cfg, 2, tmp_path / "it2", reference=reference)
    per_step = reference_logps(trainer, len(PAIRS))
    once = precompute_reference(trainer, batch_size=3)
    assert once[0] == pytest.approx(per_step[0], abs=1e-4) and once[1] == pytest.approx(per_step[1], abs=1e-4)
    assert trainer.precompute_ref_logps
    assert trainer.train_dataset["ref_chosen_logps"] == pytest.approx(once[0])
    batch = _batch(trainer, 4)
    assert torch.equal(batch["ref_chosen_logps"], torch.tensor(once[0][:4]))


@pytest.mark.parametrize("chain", ["merge", "continue"])
def test_training_with_precomputed_reference_equals_per_step_reference(tiny_dir, tmp_path, chain):
    """Same start, same pairs: precomputing the reference changes nothing but float rounding
    (losses, trained adapter, reported metrics); the "before" values it reuses match the
    policy's own."""
    cfg = make_cfg(tiny_dir, tmp_path, lora={"chain": chain})
    got = {}
    for precompute in (True, False):
        model, tok = _iteration_two(cfg, tmp_path / str(precompute), None)
        metrics, trained = train_dpo(model, tok, PAIRS, cfg, 2, tmp_path / f"it2-{precompute}", precompute=precompute)
        got[precompute] = metrics, {n: p.detach().clone() for n, p in trained.named_parameters() if "lora_" in n
                                    and ".ref." not in n}
    (m1, a1), (m0, a0) = got[True], got[False]
    assert m1["train/ref_precomputed"] == 1 and m0["train/ref_precomputed"] == 0
    assert [h["loss"] for h in m1["log_history"] if "loss" in h] == pytest.approx(
        [h["loss"] for h in m0["log_history"] if "loss" in h], abs=1e-5)
    assert a1.keys() == a0.keys() and all(torch.allclose(a1[k], a0[k], atol=1e-5) for k in a1)
    for key in ("train/logp_chosen_before", "train/logp_rejected_before", "train/logp_chosen", "train/reward_margin"):
        assert m1[key] == pytest.approx(m0[key], abs=1e-4), key
    assert m1["train/ref_gap_to_start"] < 1e-3 and m0["train/ref_gap_to_start"] < 1e-3
    assert m1["train/tokens"] == m0["train/tokens"] > 0
