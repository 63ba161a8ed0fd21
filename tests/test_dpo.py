"""course_lib.dpo against TRL 1.16's DPOTrainer on the embedded model: the same batch, loss, implicit
rewards, accuracies and adapter gradient for every loss type; the loss family against its formulas;
the adapter as reference; bad rows named."""

import copy
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from course_lib import dpo
from course_lib.data import make_story
from course_lib.lora import add_lora, load_adapter, lora_layers, save_adapter

TARGETS = ["q_proj", "v_proj", "up_proj"]
BETA = 0.2
# TRL's fused LM head sums the same float32 log-probs in another order: loss and rewards agree to
# ~1e-6 absolute, the adapter's gradient to ~1e-5 of its largest entry.
RTOL, ATOL = 1e-5, 1e-5


def ending_rows(n: int, seed: int = 0) -> list[dict]:
    """Story openers with a happy (chosen) and a sad (rejected) ending, in TRL's explicit-prompt format."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        twin = random.Random()
        twin.setstate(rng.getstate())  # same opener; the label alone picks the ending
        happy, sad = make_story(rng, "happy"), make_story(twin, "sad")
        rows.append({"prompt": happy.body, "chosen": " " + happy.ending, "rejected": " " + sad.ending})
    return rows


def _trl_step(out, base, tokenizer, rows, loss_type, label_smoothing=0.0, **config):
    """TRL's collated batch, loss, metrics and LoRA gradients for one step on ``rows``, with its adapter's
    B set to seeded random values (so policy ≠ reference); also returns that adapter saved in peft format.
    The reference is TRL's own: the PeftModel with its adapter disabled."""
    out = str(out)
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(
            model=copy.deepcopy(base), processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
            peft_config=LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=TARGETS),
            args=DPOConfig(output_dir=out, report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
                           max_length=None, per_device_train_batch_size=len(rows), loss_type=loss_type, beta=BETA,
                           label_smoothing=label_smoothing, **config))
    model = trainer.model
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    model.save_pretrained(f"{out}/adapter")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {name.replace("base_model.model.", "").replace(".default.weight", ""): p.grad
             for name, p in model.named_parameters() if p.grad is not None}
    return batch, loss.detach(), metrics, grads, f"{out}/adapter", trainer


def _ours(base, adapter_dir):
    model = copy.deepcopy(base)
    load_adapter(model, adapter_dir)
    model.train()
    return model


def _our_grads(model):
    return {f"{name}.{part}": getattr(layer, part)["default"].grad
            for name, layer in lora_layers(model) for part in ("lora_A", "lora_B")}


METRIC_NAMES = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]


@pytest.mark.parametrize("loss_type,label_smoothing,share_prompt", [
    ("sigmoid", 0.0, True), ("sigmoid", 0.0, False), ("robust", 0.1, True), ("hinge", 0.0, True), ("ipo", 0.0, True)])
def test_loss_rewards_accuracies_and_adapter_gradient_equal_trl(embedded, tmp_path, loss_type, label_smoothing,
                                                                share_prompt):
    """share_prompt: each pair's prompt run once (DPOLoss's default) or TRL's concatenated forward."""
    base, tokenizer = embedded
    rows = ending_rows(6)
    trl_batch, trl_loss, trl_metrics, trl_grads, adapter, _ = _trl_step(tmp_path, base, tokenizer, rows, loss_type,
                                                                         label_smoothing)

    batch = dpo.tokenize_preference_rows(rows, tokenizer)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(batch[key], trl_batch[key]), key
    model = _ours(base, adapter)
    loss_fn = dpo.DPOLoss(beta=BETA, loss_type=loss_type, label_smoothing=label_smoothing, share_prompt=share_prompt)
    loss = loss_fn(model, batch)
    loss.backward()
    ours = loss_fn.pending[-1]

    torch.testing.assert_close(loss.detach(), trl_loss, rtol=RTOL, atol=ATOL)
    for name in METRIC_NAMES:
        assert ours[name] == pytest.approx(trl_metrics[name], rel=RTOL, abs=ATOL), name
    assert 0 < ours["rewards/accuracies"] < 1  # the batch has pairs on both sides: accuracy is not trivially 0 or 1
    grads = _our_grads(model)
    assert grads.keys() == trl_grads.keys()
    for name, grad in grads.items():
        scale = trl_grads[name].abs().max()
        torch.testing.assert_close(grad, trl_grads[name], rtol=1e-4, atol=1e-5 * float(scale), msg=name)


@pytest.mark.parametrize("how", ["separate_model", "precomputed"])
def test_reference_as_separate_model_or_precomputed_equals_trl(embedded, tmp_path, how):
    """TRL computes the reference with the adapter off; a frozen copy of the base, or log-probs precomputed
    once (TRL's precompute_ref_log_probs columns), give the same reference."""
    base, tokenizer = embedded
    rows = ending_rows(6, seed=1)
    _, trl_loss, trl_metrics, _, adapter, _ = _trl_step(tmp_path, base, tokenizer, rows, "sigmoid")
    model = _ours(base, adapter)
    if how == "separate_model":
        reference = copy.deepcopy(base).requires_grad_(False)
        loss_fn, batch = dpo.DPOLoss(BETA, reference=reference), dpo.tokenize_preference_rows(rows, tokenizer)
    else:
        loss_fn = dpo.DPOLoss(BETA)
        batch = dpo.tokenize_preference_rows(dpo.precompute_reference_logprobs(model, rows, tokenizer, batch_size=4),
                                             tokenizer)
        assert batch["ref_chosen_logps"].shape == (len(rows),)
    loss = loss_fn(model, batch)
    torch.testing.assert_close(loss.detach(), trl_loss, rtol=RTOL, atol=ATOL)
    assert loss_fn.pending[-1]["rewards/margins"] == pytest.approx(trl_metrics["rewards/margins"], rel=RTOL, abs=ATOL)


def test_precomputed_reference_logprobs_equal_trls_columns(embedded, tmp_path):
    base, tokenizer = embedded
    rows = ending_rows(5, seed=2)
    *_, trainer = _trl_step(tmp_path, base, tokenizer, rows, "sigmoid", precompute_ref_log_probs=True,
                            precompute_ref_batch_size=2)
    model = copy.deepcopy(base)
    add_lora(model, TARGETS, r=4, alpha=8)  # any adapter: the reference switches it off
    ours = dpo.precompute_reference_logprobs(model, rows, tokenizer, batch_size=3)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor([r[key] for r in ours]), torch.tensor(trainer.train_dataset[key]),
                                   rtol=RTOL, atol=ATOL)
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in ours] == rows  # rows kept as they were


def test_sequence_logprob_is_the_completion_sum_whatever_the_padding(embedded):
    base, tokenizer = embedded
    rows = ending_rows(4, seed=3)
    batch = dpo.tokenize_preference_rows(rows, tokenizer)
    with torch.no_grad():
        together = dpo.sequence_logprobs(base, batch)  # (2B,)
        logits = base(input_ids=batch["input_ids"]).logits.float()  # (2B, T, V), no mask: padding is at the end
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        by_hand = (logp * batch["completion_mask"][:, 1:]).sum(1)
        torch.testing.assert_close(together, by_hand, rtol=1e-5, atol=1e-5)
        for i, row in enumerate(rows):  # each pair alone (less padding) gives the same sums
            chosen, rejected = dpo.sequence_logprobs(base, dpo.tokenize_preference_rows([row], tokenizer))
            torch.testing.assert_close(torch.stack([chosen, rejected]), together[[i, i + len(rows)]],
                                       rtol=1e-5, atol=1e-5)


def test_loss_family_formulas():
    """Each loss against its formula written another way (BCE with soft labels, hand-written terms)."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(7, generator=g) * 3 for _ in range(4))
    d = (pc - rc) - (pr - rr)
    beta = 0.3
    for eps in (0.0, 0.2):  # sigmoid with ε: cDPO = binary cross-entropy of βd against the soft label 1 − ε
        losses, chosen_r, rejected_r = dpo.dpo_loss(pc, pr, rc, rr, beta, "sigmoid", eps)
        expected = F.binary_cross_entropy_with_logits(beta * d, torch.full_like(d, 1 - eps), reduction="none")
        torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(chosen_r, beta * (pc - rc))
    torch.testing.assert_close(rejected_r, beta * (pr - rr))
    robust, *_ = dpo.dpo_loss(pc, pr, rc, rr, beta, "robust", 0.2)
    p = torch.sigmoid(beta * d)
    torch.testing.assert_close(robust, (-0.8 * torch.log(p) + 0.2 * torch.log(1 - p)) / 0.6)
    hinge, *_ = dpo.dpo_loss(pc, pr, rc, rr, beta, "hinge")
    torch.testing.assert_close(hinge, torch.clamp(1 - beta * d, min=0))
    ipo, *_ = dpo.dpo_loss(pc, pr, rc, rr, beta, "ipo")
    torch.testing.assert_close(ipo, (d - 1 / 0.6) ** 2)
    # IPO's loss is smallest at the margin 1/(2β), not at +∞
    at_target, *_ = dpo.dpo_loss(torch.tensor([1 / (2 * beta)]), torch.zeros(1), torch.zeros(1), torch.zeros(1),
                                 beta, "ipo")
    assert at_target.item() == 0
    # the reward metrics are detached: the loss alone carries the gradient
    pc.requires_grad_(True)
    _, chosen_r, _ = dpo.dpo_loss(pc, pr, rc, rr, beta)
    assert not chosen_r.requires_grad


def test_run_dpo_logs_trls_metrics_and_learns_the_training_pairs(embedded):
    from course_lib.training import TrainConfig

    base, tokenizer = embedded
    model = copy.deepcopy(base)
    rows = ending_rows(16, seed=4)
    history = dpo.run_dpo(model, rows, tokenizer, TrainConfig(steps=6, lr=5e-3, progress=False), batch_size=8,
                          eval_rows=rows, eval_every=3)
    assert list(lora_layers(model))  # an adapter was added
    for name in dpo.METRICS:
        assert len(history.extra[name]) == 6, name
    torch.testing.assert_close(torch.tensor(history.extra["loss"]), torch.tensor(history.loss))
    assert history.extra["rewards/margins"][0] == pytest.approx(
        history.extra["rewards/chosen"][0] - history.extra["rewards/rejected"][0], abs=1e-6)
    assert history.extra["eval/step"] == [0, 3, 6]
    assert history.extra["eval/rewards/margins"][0] == pytest.approx(0, abs=1e-6)  # B = 0: policy = reference
    assert history.extra["eval/rewards/accuracies"][-1] > 0.9
    margins = history.extra["eval/rewards/margins"]
    assert 0 < margins[1] < margins[2]  # the chosen completions pull ahead of the rejected ones


def test_dpo_trained_adapter_loads_in_peft_with_identical_logits(embedded, tmp_path):
    from peft import PeftModel

    from course_lib.training import TrainConfig

    base, tokenizer = embedded
    model = copy.deepcopy(base)
    rows = ending_rows(8, seed=5)
    dpo.run_dpo(model, rows, tokenizer, TrainConfig(steps=3, lr=1e-2, progress=False), batch_size=4, r=4, alpha=8)
    save_adapter(model, tmp_path / "dpo")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "dpo")
    batch = dpo.tokenize_preference_rows(rows, tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        ours, theirs, plain = model(**inputs).logits, loaded(**inputs).logits, base(**inputs).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-2  # the adapter did change the model


def test_bad_input_gets_a_clear_error(embedded):
    base, tokenizer = embedded
    good = ending_rows(2)

    def bad(i, **change):
        rows = [dict(r) for r in good]
        rows[i].update(change)
        return rows

    cases = [
        ([good[0], {"chosen": "a", "rejected": "b"}], r"row 1: missing field\(s\) \['prompt'\].*implicit"),
        ([good[0], {"prompt": "p", "chosen": "a"}], r"row 1: missing field\(s\) \['rejected'\]"),
        (bad(1, chosen=None), r"row 1: missing field\(s\) \['chosen'\]"),
        (bad(0, rejected=good[0]["chosen"]), r"row 0: chosen and rejected are identical"),
        (bad(1, chosen="  "), r"row 1: empty 'chosen' completion"),
        (bad(0, rejected=""), r"row 0: empty 'rejected' completion"),
        (bad(1, prompt=[{"role": "user", "content": "hi"}]), r"row 1: 'prompt' must be a string.*apply_chat_template"),
        ([], r"no preference rows"),
    ]
    for rows, message in cases:
        with pytest.raises(ValueError, match=message):
            dpo.tokenize_preference_rows(rows, tokenizer)
        if rows:
            with pytest.raises(ValueError, match=message):
                dpo.dpo_batches(rows, tokenizer, batch_size=2)

    x = torch.zeros(3)
    for beta in (0.0, -0.1):
        with pytest.raises(ValueError, match=r"beta must be positive.*got"):
            dpo.dpo_loss(x, x, x, x, beta=beta)
        with pytest.raises(ValueError, match="beta must be positive"):
            dpo.DPOLoss(beta=beta)
    with pytest.raises(ValueError, match=r"unknown loss_type 'kto'.*\['sigmoid', 'robust', 'hinge', 'ipo'\]"):
        dpo.dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match=r"label_smoothing applies to 'sigmoid' \(cDPO\) and 'robust' only"):
        dpo.dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"must lie in \[0, 0.5\)"):
        dpo.dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="one shape"):
        dpo.dpo_loss(x, x, x, torch.zeros(2))
    with pytest.raises(ValueError, match="no LoRA adapter to switch off"):  # a model cannot be its own reference
        dpo.DPOLoss()(base, dpo.tokenize_preference_rows(good, tokenizer))
